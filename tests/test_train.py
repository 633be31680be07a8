"""`python train.py` as a user runs it: single runs, grids, failures, MLflow contents."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST, client_for, mlflow_runs, run_app, run_train
from test_data import assert_one_line_error


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["backbone=resnet99"], ["backbone=resnet99: unknown backbone; choose one of", "resnet152", "resnet18"]),
        (["head=mlp"], ["head=mlp: unknown head; choose one of linear, mlp_leakyrelu_dropout, mlp_relu"]),
        (["-m", "optimizer=sgd,rmsprop"], ["optimizer=rmsprop: unknown optimizer; choose one of adam, adamw, sgd"]),
        (["optimizer.lr=0"], ["optimizer.lr=0: the learning rate must be a number > 0"]),
        (["optimizer.lr=-1e-3"], ["optimizer.lr=-0.001: the learning rate must be a number > 0"]),
        (["trainer.max_epochs=0"], ["trainer.max_epochs=0: must be an integer >= 1"]),
        (["trainer.bank_views=0"], ["trainer.bank_views=0: must be an integer >= 1"]),
        (["trainer.bank_batch_size=0"], ["trainer.bank_batch_size=0: must be an integer >= 1, or null"]),
        (["data=imagefolder", "data.root=/no/such/tiles"], ["data.root=/no/such/tiles: no such directory"]),
    ],
)
def test_bad_config_gives_a_one_line_error(tmp_path, args, fragments):
    proc = run_app(tmp_path, *FAST, *args, check=False)
    assert_one_line_error(proc, *fragments)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["backbone=resnet99"], "backbone=resnet99: unknown backbone; choose one of"),  # before Hydra composes
        (["optimizer.lr=0"], "optimizer.lr=0: the learning rate must be a number > 0"),  # from the job
    ],
)
def test_a_bad_config_is_one_line_on_stderr_and_a_non_zero_exit_from_a_real_process(tmp_path, args, fragment):
    proc = run_train(tmp_path, *FAST, *args, check=False)
    assert_one_line_error(proc, fragment)


def test_help_and_cfg_job_work_as_in_any_hydra_app(tmp_path):
    help_out = run_app(tmp_path, "--help").stdout
    for group in ("backbone", "head", "optimizer", "data", "trainer", "tracking"):
        assert f"{group}:" in help_out
    job = run_app(tmp_path, "--cfg", "job", "optimizer=adam", "optimizer.lr=5e-5").stdout
    assert "_target_: torch.optim.Adam" in job and "lr: 5.0e-05" in job
    assert "betas:" in job and "max_epochs:" in job and "uri: sqlite:///mlflow.db" in job


def test_single_run_logs_metrics_from_epoch_0_test_metrics_checkpoint_and_model(tmp_path, tiny_tree):
    run_app(tmp_path, *FAST, "data=imagefolder", f"data.root={tiny_tree}", "trainer.max_epochs=2")
    runs = mlflow_runs(tmp_path)
    assert len(runs.all) == 1 and not runs.children
    run = runs.all[0]
    assert run.info.run_name == "resnet18-linear-sgd-lr1e-04-s0"
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.0001"
    assert run.data.params["backbone.name"] == "resnet18"
    assert run.data.params["trainer.batch_size"] == "8"
    assert run.data.tags["weights_source"] == "random"
    assert run.data.tags["backbone"] == "resnet18" and run.data.tags["head"] == "linear"
    assert "trainer.max_epochs=2" in run.data.tags["hydra_overrides"]
    client = client_for(tmp_path)
    for key in ("train/loss", "train/acc", "valid/loss", "valid/acc"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2]
    for key in ("test/loss", "test/acc", "test/auroc", "test/f1", "test/balanced_acc", "best_epoch"):
        assert key in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion_matrix.json", "checkpoint", "plots"} <= artifacts
    ckpt = client.list_artifacts(run.info.run_id, "checkpoint")[0]
    assert ckpt.path == "checkpoint/best.pt" and ckpt.file_size < 50_000  # head only, not the backbone
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/confusion_matrix.png"}


def test_grid_makes_one_child_run_per_point_under_one_parent_and_logs_the_best_model(tmp_path, tiny_tree):
    import mlflow

    run_app(
        tmp_path,
        "-m",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "optimizer.lr=1e-3,1e-2",
        "head=linear,mlp_relu",
    )
    runs = mlflow_runs(tmp_path)
    assert len(runs.parents) == 1 and len(runs.children) == 4
    parent = runs.parents[0]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs.children)
    points = sorted((r.data.params["head.name"], r.data.params["optimizer.lr"]) for r in runs.children)
    assert points == [("linear", "0.001"), ("linear", "0.01"), ("mlp_relu", "0.001"), ("mlp_relu", "0.01")]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["summary"] == "4 finished, 0 failed"

    # only the best child (by validation loss) gets a full model; it loads and predicts probabilities
    best = min(runs.children, key=lambda r: r.data.metrics["best/valid/loss"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    models = mlflow.search_logged_models(experiment_ids=[best.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [best.info.run_id]
    model = mlflow.pyfunc.load_model(models[0].model_uri)
    probs = np.asarray(model.predict(np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)))
    assert probs.shape[0] == 3 and np.all((probs >= 0) & (probs <= 1))


def test_a_diverging_run_is_failed_and_the_grid_goes_on(tmp_path, tiny_tree):
    proc = run_app(
        tmp_path,
        "-m",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "optimizer.lr=1e-3,1e38",
        "trainer.max_epochs=3",
        check=False,
    )
    assert proc.returncode != 0
    runs = mlflow_runs(tmp_path)
    by_lr = {r.data.params["optimizer.lr"]: r for r in runs.children}
    assert by_lr["0.001"].info.status == "FINISHED"
    failed = by_lr["1e+38"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"].startswith("loss became")
    summary = "1 finished, 1 failed: resnet18-linear-sgd-lr1e+38-s0 (loss became"
    assert summary not in proc.stdout, "said once, by the last line"
    assert summary in proc.stderr.strip().splitlines()[-1]
    assert runs.parents[0].info.status == "FAILED"


def test_a_diverging_single_run_exits_non_zero_with_one_line(tmp_path, tiny_tree):
    proc = run_app(tmp_path, *FAST, "data=imagefolder", f"data.root={tiny_tree}", "optimizer.lr=1e38", check=False)
    assert_one_line_error(proc, "resnet18-linear-sgd-lr1e+38-s0 failed: loss became")
    assert mlflow_runs(tmp_path).all[0].info.status == "FAILED"


def test_the_demo_data_is_the_default(tmp_path):
    run_app(
        tmp_path, "backbone.weights=none", "trainer.max_epochs=1", "trainer.num_workers=0", "data.tiles_per_slide=2"
    )
    run = mlflow_runs(tmp_path).all[0]
    assert run.data.params["data.kind"] == "demo"
    assert "demo-" in run.data.tags["data_root"]
    assert run.data.metrics["test/acc"] >= 0
