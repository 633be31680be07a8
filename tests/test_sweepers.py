"""The sweeper plugins on a trivial objective, in-process (as Hydra tests its own sweepers with
``example/sphere.py``): the app's real config and callback, ``tests/apps/objective.py`` instead of
training. What a trial's *job* logs (its MLflow run when it fails or is pruned) is checked with real
training in test_hpo.py."""

from __future__ import annotations

import json
import re

import optuna
import pytest
import yaml
from conftest import REPO, assert_interrupted_point_ran_again, make_tree, mlflow_runs, run_app

OBJECTIVE = REPO / "tests" / "apps" / "objective.py"
PRUNE_AFTER_EPOCH_1 = "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:0.0,n_warmup_steps:1}"
LR_ONLY = ["hydra.sweeper.n_trials=1", "hydra.sweeper.pruner=null"]


def sweep(cwd, tree, *more, check=True):
    """``objective.py -m hydra/sweeper=optuna ...`` on ``tree``, in ``cwd``."""
    args = ["-m", "hydra/sweeper=optuna", "data=imagefolder", f"data.root={tree}", *more]
    return run_app(cwd, *args, check=check, script=OBJECTIVE)


def jobs(cwd) -> list[dict]:
    path = cwd / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def study(cwd, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'optuna.db'}")


def study_names(cwd):
    return sorted(optuna.get_all_study_names(storage=f"sqlite:///{cwd / 'optuna.db'}"))


def this_run(cwd):
    """Each sweep's optimization_results.yaml 'this_run' (trials it told), oldest first."""
    return [
        yaml.safe_load(p.read_text())["this_run"] for p in sorted(cwd.glob("multirun/*/*/optimization_results.yaml"))
    ]


def results(cwd) -> dict:
    [path] = cwd.glob("multirun/*/*/optimization_results.yaml")
    return yaml.safe_load(path.read_text())


def test_a_nan_trial_is_fail_and_the_study_still_reaches_n_trials(tmp_path, tiny_tree):
    proc = sweep(
        tmp_path,
        tiny_tree,
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.storage=sqlite:///optuna.db",
        "hydra.sweeper.study_name=nan",
        "optimizer.lr=choice(1e-3, 1e38)",
        "seed=choice(0, 1)",
    )
    assert sorted(t.state.name for t in study(tmp_path, "nan").trials) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert "4 finished trials (2 COMPLETE, 0 PRUNED, 2 FAIL)" in proc.stdout
    assert results(tmp_path)["counts"] == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 2}
    assert results(tmp_path)["best_params"]["optimizer.lr"] == 1e-3
    runs = mlflow_runs(tmp_path)
    assert len(runs.parents) == 1 and runs.parents[0].info.status == "FINISHED"


def test_max_failure_rate_zero_stops_the_study_at_the_first_failure(tmp_path, tiny_tree):
    proc = sweep(
        tmp_path,
        tiny_tree,
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=2",
        "optimizer.lr=choice(1e38, 1e-3)",
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"1 of [12] trials failed, more than hydra.sweeper.max_failure_rate=0.0; .*", last), last
    assert mlflow_runs(tmp_path).parents[0].info.status == "FAILED"


@pytest.mark.parametrize("storage", [None, "sqlite:///optuna.db"])
def test_the_pruner_stops_trials_through_the_jobs_reports(tmp_path, tiny_tree, storage):
    more = [f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=prune"] if storage else []
    proc = sweep(
        tmp_path,
        tiny_tree,
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_trials=2",
        "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
        "trainer.max_epochs=3",
        PRUNE_AFTER_EPOCH_1,
        *more,
    )
    assert "2 finished trials (0 COMPLETE, 2 PRUNED, 0 FAIL)" in proc.stdout
    assert len(jobs(tmp_path)) == 2
    if storage:
        trials = study(tmp_path, "prune").trials
        assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
        assert all(sorted(t.intermediate_values) == [0, 1] for t in trials), "stopped at epoch 1 of 3"


def test_in_memory_study_with_out_of_process_launcher_and_pruner_is_a_clear_error(tmp_path, tiny_tree):
    proc = sweep(
        tmp_path,
        tiny_tree,
        "hydra/launcher=joblib",
        PRUNE_AFTER_EPOCH_1,
        "optimizer.lr=interval(1e-4, 1e-2)",
        check=False,
    )
    assert proc.returncode != 0
    assert "the study is in memory and the launcher" in proc.stderr
    assert not jobs(tmp_path), "refused before any job ran"


def test_group_choices_are_searched_as_config_groups(tmp_path, tiny_tree):
    sweep(tmp_path, tiny_tree, "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=10", "optimizer=choice(sgd, adam)")
    assert sorted(j["optimizer"] for j in jobs(tmp_path)) == ["torch.optim.Adam", "torch.optim.SGD"]
    assert this_run(tmp_path) == [{"COMPLETE": 2}], "the grid is exhausted after its 2 points"


def test_each_data_set_gets_its_own_auto_named_study(tmp_path):
    first, second = make_tree(tmp_path / "first", seed=0), make_tree(tmp_path / "second", seed=1)
    for tree in (first, second):
        sweep(tmp_path, tree, "hpo=lr_search", *LR_ONLY)
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
    sweep(tmp_path, first, *named)
    assert study_names(tmp_path) == ["mine"], "an explicit name is used as given"
    proc = sweep(tmp_path, second, *named, "optimizer.momentum=0.5", check=False)
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
    (tmp_path / "interrupt-once").touch()  # the first job returns hpo.INTERRUPTED, as an infrastructure stop does
    proc = sweep(
        tmp_path,
        tiny_tree,
        "hydra.sweeper.storage=sqlite:///optuna.db",
        "hydra.sweeper.study_name=infra",
        "hydra.sweeper.n_trials=2",
        "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
    )
    assert "2 finished trials (2 COMPLETE, 0 PRUNED, 0 FAIL)" in proc.stdout
    assert_interrupted_point_ran_again(study(tmp_path, "infra").trials)
    assert this_run(tmp_path) == [{"INTERRUPTED": 1, "COMPLETE": 2}]
    assert [j["lr"] for j in jobs(tmp_path)][:2] == [jobs(tmp_path)[0]["lr"]] * 2, "the same point, again"


def test_the_grids_sweeper_runs_each_grid_and_a_command_line_key_replaces_the_grids_one(tmp_path, tiny_tree):
    # experiment=study/resnet18_heads: Adam x 7 LRs + SGD x 3 heads x 6 LRs; optimizer.lr on the command line wins
    run_app(
        tmp_path,
        "-m",
        "experiment=study/resnet18_heads",
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "optimizer.lr=1e-4,1e-3",
        "~hydra.callbacks.mlflow_sweep",  # its summary counts what trained jobs record (test_report.py)
        script=OBJECTIVE,
    )
    points = sorted((j["optimizer"], j["lr"]) for j in jobs(tmp_path))
    adam, sgd = "torch.optim.Adam", "torch.optim.SGD"
    assert points == sorted([(adam, 1e-4), (adam, 1e-3)] + [(sgd, 1e-4), (sgd, 1e-3)] * 3)
