"""What a researcher sees in the MLflow UI (issue 17), checked in the store the UI reads: the
experiment's kind, the runs' params, descriptions, inputs and models, the sweep's parent run."""

from __future__ import annotations

import pytest
from conftest import FAST, client_for, make_tree, mlflow_runs, run_app


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One small grid (two learning rates, three epochs) on a tiny tree: its folder."""
    cwd = tmp_path_factory.mktemp("sweep")
    tree = make_tree(cwd / "tiles")
    run_app(
        cwd,
        "-m",
        *FAST,
        "trainer.max_epochs=3",
        "data=imagefolder",
        f"data.root={tree}",
        "optimizer.lr=1e-3,1e-2",
    )
    return cwd


def test_the_experiment_opens_on_its_runs_and_make_ui_prints_their_url(sweep):
    from resnet_sweep.store import runs_url

    experiment = client_for(sweep).get_experiment_by_name("resnet-sweep")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    assert runs_url(uri, "resnet-sweep") == f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
    assert "no experiment 'other'" in runs_url(uri, "other")
    assert len(mlflow_runs(sweep).children) == 2
