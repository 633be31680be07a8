"""The Optuna sweeper with trained jobs: search-space syntax, what trials log, resume after SIGKILL
(the sweeper's own logic on a trivial objective: test_sweepers.py)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from conftest import FAST, TRAIN_PY, client_for, fresh_store, mlflow_runs, run_app
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.resnet_sweep_optuna._space import search_space


def test_each_override_form_maps_to_its_optuna_distribution():
    distributions, fixed = search_space(
        [
            "optimizer.lr=tag(log, interval(1e-6, 1e-2))",
            "optimizer.momentum=interval(0.5, 0.99)",
            "trainer.batch_size=range(16, 65, step=16)",
            "trainer.patience=int(interval(2, 8))",
            "data.seed=interval(2, 8)",
            "optimizer=choice(sgd, adam)",
            "head=linear,mlp_relu",
            "seed=range(0, 3)",
            "trainer.max_epochs=3",
        ]
    )
    assert distributions["optimizer.lr"] == FloatDistribution(1e-6, 1e-2, log=True)
    assert distributions["optimizer.momentum"] == FloatDistribution(0.5, 0.99)
    assert distributions["trainer.batch_size"] == IntDistribution(16, 64, step=16)
    assert distributions["trainer.patience"] == IntDistribution(2, 8)
    assert distributions["data.seed"] == FloatDistribution(2.0, 8.0)  # Hydra's interval is float
    assert distributions["optimizer"] == CategoricalDistribution(["sgd", "adam"])
    assert distributions["head"] == CategoricalDistribution(["linear", "mlp_relu"])
    assert distributions["seed"] == IntDistribution(0, 2)
    assert fixed == {"trainer.max_epochs": "3"}


def optuna_args(tree, *more):
    return ["-m", "hydra/sweeper=optuna", *FAST, "data=imagefolder", f"data.root={tree}", *more]


def study(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def study_names(tmp_path):
    return sorted(optuna.get_all_study_names(storage=f"sqlite:///{tmp_path / 'optuna.db'}"))


PRUNE_AFTER_EPOCH_1 = "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:0.0,n_warmup_steps:1}"


def test_trial_jobs_log_failed_pruned_and_group_choice_runs_under_one_study_run(tmp_path, tiny_tree):
    # what the sweeper does with NaN, pruned and group-choice trials is in test_sweepers.py (trivial
    # objective); here the trained jobs' side: each trial's MLflow run says what happened to it
    proc = run_app(
        tmp_path,
        *optuna_args(
            tiny_tree,
            "hydra/sweeper/sampler=grid",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.max_failure_rate=1.0",
            "hydra.sweeper.storage=sqlite:///optuna.db",
            "hydra.sweeper.study_name=jobs",
            "optimizer=choice(sgd, adam)",
            "optimizer.lr=choice(1e-3, 1e38)",
            "trainer.max_epochs=3",
            PRUNE_AFTER_EPOCH_1,
        ),
    )
    assert "4 finished trials (0 COMPLETE, 2 PRUNED, 2 FAIL)" in proc.stdout
    assert sorted(t.state.name for t in study(tmp_path, "jobs").trials) == ["FAIL", "FAIL", "PRUNED", "PRUNED"]
    runs = mlflow_runs(tmp_path)
    assert len(runs.parents) == 1 and len(runs.children) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == runs.parents[0].info.run_id for r in runs.children)
    failed = [r for r in runs.children if r.info.status == "FAILED"]
    assert {r.data.params["optimizer.lr"] for r in failed} == {"1e+38"} and len(failed) == 2
    reasons = {r.data.tags["optimizer"]: r.data.tags["failure_reason"] for r in failed}
    assert reasons["sgd"].startswith("loss became"), reasons  # (Adam at 1e38 overflows in its step instead)
    assert reasons["adam"], reasons
    pruned = [r for r in runs.children if r.info.status == "KILLED"]
    assert {r.data.params["optimizer.lr"] for r in pruned} == {"0.001"} and len(pruned) == 2
    for run in pruned:
        assert run.data.tags["optuna_state"] == "PRUNED" and run.data.tags["pruned_at_epoch"] == "1"
        assert "test/acc" not in run.data.metrics  # stopped at epoch 1 of 3
    assert sorted(r.data.tags["optimizer"] for r in runs.children) == ["adam", "adam", "sgd", "sgd"]
    for run in runs.children:  # named with their trial number
        assert run.info.run_name.endswith(f"-s0-t{run.data.tags['optuna_trial']}"), run.info.run_name
    assert not any(k.endswith("._target_") for r in runs.children for k in r.data.params)  # plumbing: not params
    # the study's parent run: its overrides as params, its report (description and report/)
    parent = runs.parents[0]
    assert parent.data.params["optimizer.lr"] == "choice(1e-3, 1e38)"
    assert parent.data.params["search_space.optimizer"] == "choice sgd, adam"  # the space as searched
    assert parent.data.params["search_space.optimizer.lr"] == "choice 0.001, 1e+38"
    assert "Sweep report" not in parent.data.tags["mlflow.note.content"]  # the title is the run's name
    assert "Runs that did not finish" in parent.data.tags["mlflow.note.content"]
    artifacts = {a.path for a in client_for(tmp_path).list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/runs.csv"} <= artifacts


def mid_trial(cwd) -> bool:
    """A trial's job has saved an epoch and not finished."""
    import torch

    for path in (cwd / ".resnet-sweep" / "resume").glob("*.pt"):
        try:
            state = torch.load(path, weights_only=True)
        except Exception:  # being replaced right now
            continue
        if not state.get("finished") and (state.get("epoch") or -1) >= 1:
            return True
    return False


@pytest.mark.e2e
def test_resume_after_sigkill_reaches_exactly_n_trials_under_one_study_run(tmp_path, tiny_tree):
    # the naive loop and 4 epochs: trials slow enough to be caught running
    args = optuna_args(
        tiny_tree,
        "hpo=lr_search",
        "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=4",
        "trainer.feature_bank=off",
        "hydra.sweeper.pruner=null",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    fresh_store(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    db = tmp_path / "optuna.db"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:  # kill once a trial is COMPLETE, the next RUNNING
            time.sleep(0.1)
            if not db.exists():
                continue
            try:
                with sqlite3.connect(db) as con:
                    states = [s for (s,) in con.execute("select state from trials")]
                with sqlite3.connect(tmp_path / "mlflow.db") as con:  # the study run + the trial's run
                    running_runs = con.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
            except sqlite3.Error:
                continue
            if states.count("COMPLETE") >= 1 and "RUNNING" in states and running_runs >= 2 and mid_trial(tmp_path):
                break
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()

    [name] = study_names(tmp_path)
    assert re.fullmatch(r"lr_search-resnet18-linear-imagefolder-[0-9a-f]{8}", name)
    assert any(t.state.name == "RUNNING" for t in study(tmp_path, name).trials)
    [killed_run] = [r for r in mlflow_runs(tmp_path).children if r.info.status == "RUNNING"]
    out = run_app(tmp_path, *args).stdout
    assert study_names(tmp_path) == [name], "the same command resumes the same auto-named study"
    trials = study(tmp_path, name).trials
    released = [t for t in trials if t.system_attrs.get("resnet_sweep:released")]
    counted = [t for t in trials if not t.system_attrs.get("resnet_sweep:released")]
    assert len(released) == 1 and released[0].state.name == "FAIL"  # the killed trial, replaced
    assert len(counted) == 4 and all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in counted)
    assert "4 finished trials" in out
    assert len({t.number for t in trials}) == len(trials)

    runs = mlflow_runs(tmp_path)
    assert len(runs.parents) == 1  # one study run holding both invocations' trials
    parent = runs.parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["resumed"] == "true"
    assert len([r for r in runs.children if r.info.status == "FINISHED"]) == sum(
        t.state.name == "COMPLETE" for t in counted
    )
    # the killed trial's point runs again, and its replacement continues the killed trial's MLflow run
    # (and its saved epochs): no run is left behind RUNNING or KILLED
    retry = next(t for t in counted if t.system_attrs.get("failed_trial") == released[0].number)
    assert retry.params == released[0].params
    continued = next(r for r in runs.children if r.info.run_id == killed_run.info.run_id)
    assert continued.info.status == "FINISHED" and continued.data.tags["optuna_trial"] == str(retry.number)
    assert int(continued.data.tags["resumed_at_epoch"]) >= 2, "the killed trial's epochs were kept"
    assert all(r.info.status == "FINISHED" for r in runs.children)
    assert "plots/optimization_history.png" in {
        a.path for a in mlflow_runs_client(tmp_path).list_artifacts(parent.info.run_id, "plots")
    }


def mlflow_runs_client(tmp_path):
    from conftest import client_for

    return client_for(tmp_path)
