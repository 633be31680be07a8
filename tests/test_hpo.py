"""The Optuna sweeper: search-space syntax, failures, pruning, resume, group choices."""

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
import yaml
from conftest import FAST, REPO, TRAIN_PY, assert_interrupted_point_ran_again, make_tree, mlflow_runs, run_train
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


def this_run(tmp_path):
    """Each sweep's optimization_results.yaml 'this_run' (trials it told), oldest first."""
    return [
        yaml.safe_load(p.read_text())["this_run"]
        for p in sorted(tmp_path.glob("multirun/*/*/optimization_results.yaml"))
    ]


def test_a_nan_trial_is_fail_and_the_study_still_reaches_n_trials(tmp_path, tiny_tree):
    proc = run_train(
        tmp_path,
        *optuna_args(
            tiny_tree,
            "hydra/sweeper/sampler=grid",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.max_failure_rate=1.0",
            "hydra.sweeper.storage=sqlite:///optuna.db",
            "hydra.sweeper.study_name=nan",
            "optimizer.lr=choice(1e-3, 1e38)",
            "seed=choice(0, 1)",
        ),
    )
    states = sorted(t.state.name for t in study(tmp_path, "nan").trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert "4 finished trials (2 COMPLETE, 0 PRUNED, 2 FAIL)" in proc.stdout
    runs = mlflow_runs(tmp_path)
    assert len(runs.parents) == 1 and len(runs.children) == 4
    failed = [r for r in runs.children if r.info.status == "FAILED"]
    assert {r.data.params["optimizer.lr"] for r in failed} == {"1e+38"}
    assert all(r.data.tags["failure_reason"].startswith("loss became") for r in failed)
    results = yaml.safe_load(next(tmp_path.glob("multirun/*/*/optimization_results.yaml")).read_text())
    assert results["counts"] == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 2}
    assert results["best_params"]["optimizer.lr"] == 1e-3


def test_max_failure_rate_zero_stops_the_study_at_the_first_failure(tmp_path, tiny_tree):
    proc = run_train(
        tmp_path,
        *optuna_args(
            tiny_tree, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2", "optimizer.lr=choice(1e38, 1e-3)"
        ),
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"1 of [12] trials failed, more than hydra.sweeper.max_failure_rate=0.0; .*", last), last
    assert mlflow_runs(tmp_path).parents[0].info.status == "FAILED"


PRUNE_AFTER_EPOCH_1 = "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:0.0,n_warmup_steps:1}"


@pytest.mark.parametrize("storage", [None, "sqlite:///optuna.db"])
def test_pruning_stops_trials_and_mlflow_says_pruned(tmp_path, tiny_tree, storage):
    more = [f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=prune"] if storage else []
    proc = run_train(
        tmp_path,
        *optuna_args(
            tiny_tree,
            "hydra/sweeper/sampler=random",
            "hydra.sweeper.sampler.seed=0",
            "hydra.sweeper.n_trials=2",
            "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            "trainer.max_epochs=3",
            PRUNE_AFTER_EPOCH_1,
            *more,
        ),
    )
    assert "2 finished trials (0 COMPLETE, 2 PRUNED, 0 FAIL)" in proc.stdout
    runs = mlflow_runs(tmp_path)
    assert len(runs.children) == 2
    for run in runs.children:
        assert run.info.status == "KILLED"
        assert run.data.tags["optuna_state"] == "PRUNED" and run.data.tags["pruned_at_epoch"] == "1"
        assert "test/acc" not in run.data.metrics  # stopped at epoch 1 of 3
    if storage:
        assert all(t.state.name == "PRUNED" for t in study(tmp_path, "prune").trials)


def test_in_memory_study_with_out_of_process_launcher_and_pruner_is_a_clear_error(tmp_path, tiny_tree):
    proc = run_train(
        tmp_path,
        *optuna_args(tiny_tree, "hydra/launcher=joblib", PRUNE_AFTER_EPOCH_1, "optimizer.lr=interval(1e-4, 1e-2)"),
        check=False,
    )
    assert proc.returncode != 0
    assert "the study is in memory and the launcher" in proc.stderr


def test_group_choices_produce_runs_with_both_optimizers(tmp_path, tiny_tree):
    run_train(
        tmp_path,
        *optuna_args(
            tiny_tree, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=10", "optimizer=choice(sgd, adam)"
        ),
    )
    runs = mlflow_runs(tmp_path)
    assert sorted(r.data.tags["optimizer"] for r in runs.children) == ["adam", "sgd"]
    assert sorted(r.data.params["optimizer._target_"] for r in runs.children) == ["torch.optim.Adam", "torch.optim.SGD"]


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
    out = run_train(tmp_path, *args).stdout
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


# ---------------------------------------------------------------- one study, one data set and config

LR_ONLY = ["hydra.sweeper.n_trials=1", "hydra.sweeper.pruner=null"]


def test_each_data_set_gets_its_own_auto_named_study(tmp_path):
    first, second = make_tree(tmp_path / "first", seed=0), make_tree(tmp_path / "second", seed=1)
    for tree in (first, second):
        run_train(tmp_path, *optuna_args(tree, "hpo=lr_search", *LR_ONLY))
    names = study_names(tmp_path)
    assert len(names) == 2, names
    assert all(re.fullmatch(r"lr_search-resnet18-linear-imagefolder-[0-9a-f]{8}", n) for n in names), names
    assert this_run(tmp_path) == [{"COMPLETE": 1}, {"COMPLETE": 1}], "each sweep ran its own trial"
    studies = [study(tmp_path, n) for n in names]
    assert all([t.state.name for t in s.trials] == ["COMPLETE"] for s in studies)
    assert len({s.user_attrs["data_fingerprint"] for s in studies}) == 2
    assert all(s.user_attrs["searched_params"] == ["optimizer.lr"] for s in studies)
    assert all("optimizer.lr" not in s.user_attrs["fixed_config"] for s in studies)
    assert len(mlflow_runs(tmp_path).parents) == 2


def test_a_named_study_refuses_other_data_or_settings_in_one_line(tmp_path):
    first, second = make_tree(tmp_path / "first", seed=0), make_tree(tmp_path / "second", seed=1)
    named = [
        "hydra.sweeper.storage=sqlite:///optuna.db",
        "hydra.sweeper.study_name=mine",
        *LR_ONLY,
        "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
    ]
    run_train(tmp_path, *optuna_args(first, *named))
    assert study_names(tmp_path) == ["mine"], "an explicit name is used as given"
    proc = run_train(tmp_path, *optuna_args(second, *named, "optimizer.momentum=0.5"), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"hydra.sweeper.study_name=mine: the study was made on other data \(fingerprint "
        r"[0-9a-f]{8} -> [0-9a-f]{8}\) / with optimizer.momentum=0.9, now 0.5; "
        r"use another study_name",
        last,
    ), proc.stderr[-3000:]
    assert len(study(tmp_path, "mine").trials) == 1
    assert this_run(tmp_path) == [{"COMPLETE": 1}]


def test_an_interrupted_trial_is_released_and_its_params_run_again(tmp_path, tiny_tree):
    # the job of the first trial returns hpo.INTERRUPTED, as job.run_job does for an infrastructure stop
    app = tmp_path / "app.py"
    app.write_text(f"""
from pathlib import Path
import hydra
from resnet_sweep import hpo
from resnet_sweep.job import run_job

@hydra.main(version_base="1.3", config_path={str(REPO / "conf")!r}, config_name="train")
def main(cfg):
    marker = Path("interrupted-once")
    if not marker.exists():
        marker.touch()
        return hpo.INTERRUPTED
    return run_job(cfg)

main()
""")
    args = optuna_args(
        tiny_tree,
        "hydra.sweeper.storage=sqlite:///optuna.db",
        "hydra.sweeper.study_name=infra",
        "hydra.sweeper.n_trials=2",
        "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, str(app), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 finished trials (2 COMPLETE, 0 PRUNED, 0 FAIL)" in proc.stdout
    assert_interrupted_point_ran_again(study(tmp_path, "infra").trials)
    assert this_run(tmp_path) == [{"INTERRUPTED": 1, "COMPLETE": 2}]
