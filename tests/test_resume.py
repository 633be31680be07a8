"""Nothing lost: a killed job resumes its MLflow run where it stopped; finished jobs are skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, TRAIN_PY, client_for, fresh_store, make_tree, mlflow_runs, run_app


def slow_args(tree):
    # the naive loop (no feature bank) on 56-px crops: slow enough to be killed between epochs
    return [
        *FAST,
        "data=imagefolder",
        f"data.root={tree}",
        "backbone.crop_size=56",
        "trainer.max_epochs=5",
        "trainer.patience=null",
        "trainer.feature_bank=off",
        "optimizer.lr=1e-2",
        "head=mlp_leakyrelu_dropout",
    ]


def resume_state(cwd):
    states = list((cwd / ".resnet-sweep" / "resume").glob("*.pt"))
    if not states:
        return None
    try:
        return torch.load(states[0], weights_only=True)
    except Exception:  # being replaced right now
        return None


@pytest.mark.e2e
def test_sigkill_mid_training_then_rerun_continues_the_same_run_exactly(tmp_path):
    tree = make_tree(tmp_path / "tiles", per_class=(24, 6, 6), size=64)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir(), clean.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fresh_store(killed)
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), *slow_args(tree)],
        cwd=killed,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            state = resume_state(killed)
            if state and state.get("epoch", -1) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert resume_state(killed)["epoch"] in (2, 3)

    out = run_app(killed, *slow_args(tree))
    assert "resuming MLflow run" in out.stdout + out.stderr
    run_app(clean, *slow_args(tree))

    runs = mlflow_runs(killed).all
    assert len(runs) == 1, "no duplicate run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    client = client_for(killed)
    for key in ("valid/loss", "train/loss", "valid/acc"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3, 4, 5], (key, steps)
    reference = mlflow_runs(clean).all[0]
    for key in ("best/valid/loss", "test/loss", "test/acc", "best_epoch"):
        assert run.data.metrics[key] == pytest.approx(reference.data.metrics[key], rel=1e-4, abs=1e-5), key
    ref_client = client_for(clean)
    assert [
        m.value for m in sorted(client.get_metric_history(run.info.run_id, "valid/loss"), key=lambda m: m.step)
    ] == pytest.approx(
        [
            m.value
            for m in sorted(ref_client.get_metric_history(reference.info.run_id, "valid/loss"), key=lambda m: m.step)
        ],
        rel=1e-4,
    )


def test_a_finished_job_is_skipped_and_resume_false_starts_fresh(tmp_path, tiny_tree):
    args = [*FAST, "data=imagefolder", f"data.root={tiny_tree}"]
    run_app(tmp_path, *args)
    again = run_app(tmp_path, *args)
    assert "already finished" in again.stdout + again.stderr
    assert len(mlflow_runs(tmp_path).all) == 1
    run_app(tmp_path, *args, "trainer.resume=false")
    assert len(mlflow_runs(tmp_path).all) == 2


def test_rerunning_a_grid_reuses_by_config_and_leaves_the_runs_with_their_sweep(tmp_path, tiny_tree):
    args = ["-m", *FAST, "data=imagefolder", f"data.root={tiny_tree}", "optimizer.lr=1e-3,1e-2"]
    run_app(tmp_path, *args)
    first = mlflow_runs(tmp_path).parents[0]
    out = run_app(tmp_path, *args)  # a new time-stamped sweep folder, the same jobs
    assert (out.stdout + out.stderr).count("already finished") == 2
    assert "0 finished, 0 failed, 2 reused" in out.stdout
    runs = mlflow_runs(tmp_path)
    assert len(runs.children) == 2 and len(runs.parents) == 2
    # the earlier sweep's record is not rewritten: its runs stay its children
    assert all(r.data.tags["mlflow.parentRunId"] == first.info.run_id for r in runs.children)
    newest = max(runs.parents, key=lambda r: r.info.start_time)
    assert sorted(newest.data.tags["reused_run_ids"].split(",")) == sorted(r.info.run_id for r in runs.children)
    assert newest.data.tags["summary"] == "0 finished, 0 failed, 2 reused"
    assert newest.data.tags["best_run_id"] == first.data.tags["best_run_id"]
