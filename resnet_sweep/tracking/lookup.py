"""Finding runs in the MLflow store: a sweep's parent and children, the best run, a run's logged model
and checkpoint. Shared by the sweep callback, ``resnet-sweep report`` and ``resnet-sweep predict``."""

from __future__ import annotations

import contextlib
import tempfile

import mlflow
from mlflow.tracking import MlflowClient

from resnet_sweep.config import objective as objectives
from resnet_sweep.core.errors import UserError


def find_parent(client: MlflowClient, experiment: str | None, parent_id: str | None):
    """The sweep's parent run: ``parent_id``, or the latest sweep of ``experiment``."""
    if parent_id:
        try:
            return client.get_run(parent_id)
        except Exception:
            raise UserError(f"--parent {parent_id}: no such run in {mlflow.get_tracking_uri()}") from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"--experiment {experiment}: no such experiment in {mlflow.get_tracking_uri()}")
    runs = client.search_runs(
        [exp.experiment_id], "tags.sweep = 'true'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        raise UserError(f"experiment {experiment}: no sweep yet (run `python train.py -m ...` first)")
    return runs[0]


def child_runs(client: MlflowClient, parent) -> list:
    """Every job run of the sweep whose parent run is ``parent``."""
    return client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=10000
    )


def best_run(runs, objective: str | None = None):
    """The run with the best ``best/<objective>`` (``objective`` None: each run's own, its
    ``objective`` tag); runs that never improved on their untrained epoch 0 are left out (their
    figures are the untrained head's). None when no run has a finite value."""

    def own(run) -> str:
        return objective or run.data.tags.get("objective", "valid/loss")

    return objectives.best(
        (r for r in runs if r.data.tags.get("never_improved") != "true"),
        lambda r: r.data.metrics.get(f"best/{own(r)}"),
        own,
    )


def logged_models(run) -> list:
    """The MLflow models logged from ``run`` whole (READY; not one whose copy failed, a full disk),
    (a store that cannot list them: none)."""
    with contextlib.suppress(Exception):
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        )
        return [m for m in models if str(m.status).rsplit(".", 1)[-1] == "READY"]
    return []


@contextlib.contextmanager
def downloaded_checkpoint(run):
    """The run's ``checkpoint/best.pt``, downloaded to a temporary file for the block's duration."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="checkpoint/best.pt", dst_path=tmp
            )
        except Exception:
            raise UserError(f"run {run.info.run_id} ({run.info.run_name}) has no checkpoint/best.pt") from None
        yield path
