"""The Optuna study in MLflow: one parent run per study (joined by concurrent sweeps, reopened on
resume), its trials' runs marked when interrupted, and the study's results and plots at the end."""

from __future__ import annotations

import logging
import time
import warnings

from mlflow.tracking import MlflowClient

from resnet_sweep.core.redaction import redact
from resnet_sweep.tracking import plots
from resnet_sweep.tracking.runs import FAILURE_TAG, set_parent
from resnet_sweep.tracking.store import connect

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"


def describe(distribution) -> str:
    """A search dimension in words: ``log-uniform 1e-06 .. 0.01``, ``choice sgd, adam``."""
    import optuna.distributions as od

    if isinstance(distribution, od.CategoricalDistribution):
        return "choice " + ", ".join(str(c) for c in distribution.choices)
    kind = "int" if isinstance(distribution, od.IntDistribution) else "uniform"
    text = f"{'log-' if distribution.log else ''}{kind} {distribution.low:g} .. {distribution.high:g}"
    step = getattr(distribution, "step", None)
    return text + (f" step {step:g}" if step is not None and not (kind == "int" and step == 1) else "")


def log_search_space(parent_id: str, distributions: dict) -> None:
    """The study's search space as its parent run's params (``search_space.optimizer.lr``); a resumed
    study has them already."""
    client = MlflowClient()
    for key, distribution in distributions.items():
        try:
            client.log_param(parent_id, f"search_space.{key}", describe(distribution))
        except Exception as e:  # the same value again is fine; a changed space is the study's own check
            log.debug("search space param %s not logged: %s", key, e)


def open_study_parent(config, study, storage_url: str | None, created: bool = True, wait_s: float = 60) -> str:
    """The study's MLflow parent run: created once per study by the sweep that created the study,
    joined by sweeps working on it at the same time and reopened when a persistent study is
    resumed, so all its trials stay under one run."""
    experiment_id = connect(config.tracking)
    client = MlflowClient()
    parent_id = study.user_attrs.get(PARENT_ATTR)
    if not parent_id and not created:
        parent_id = _parent_of_new_study(study, wait_s)
    if parent_id:
        try:
            client.update_run(parent_id, status="RUNNING")
            client.set_tag(parent_id, "resumed", "true")  # or joined by a sweep on another machine
        except Exception:
            parent_id = None  # another tracking store: start a new parent there
    if not parent_id:
        run = client.create_run(
            experiment_id,
            run_name=f"study-{study.study_name}",
            tags={
                "sweep": "true",
                "optuna_study": study.study_name,
                "storage": redact(storage_url or "memory"),
                "objective": str(config.objective),
                "sweep_dir": str(config.hydra.sweep.dir),
            },
        )
        parent_id = run.info.run_id
        study.set_user_attr(PARENT_ATTR, parent_id)
    client.set_tag(parent_id, "hydra_overrides", redact(" ".join(config.hydra.overrides.task)))
    set_parent(config, parent_id)
    log.info("MLflow parent run %s for study '%s'", parent_id, study.study_name)
    return parent_id


def _parent_of_new_study(study, wait_s: float) -> str | None:
    """Another sweep created this study a moment ago and is opening its parent run: wait for it
    (a study that already has trials but no parent run gets a new one)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not study.get_trials(deepcopy=False):
        parent_id = study.user_attrs.get(PARENT_ATTR)
        if parent_id:
            return parent_id
        time.sleep(0.5)
    return study.user_attrs.get(PARENT_ATTR)


def mark_trial_runs_killed(parent_id: str, trial_number: int, reason: str) -> None:
    client = MlflowClient()
    parent = client.get_run(parent_id)
    for run in client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_id}' and tags.optuna_trial = '{trial_number}' "
            "and attributes.status = 'RUNNING'"
        ),
    ):
        client.set_tag(run.info.run_id, FAILURE_TAG, reason)
        client.set_tag(run.info.run_id, "optuna_state", "FAIL")
        client.set_terminated(run.info.run_id, "KILLED")


def close_study_parent(
    parent_id, study, results, failed: str | None = None, distributions=None, results_file=None, killed: bool = False
) -> None:
    """Study results onto the parent run: best params/value, counts, the results file and Optuna's
    matplotlib plots. On failure, mark the parent FAILED with the reason (``killed``: KILLED, for a
    sweep stopped by a signal, which the same command resumes)."""
    client = MlflowClient()
    if failed is not None:
        client.set_tag(
            parent_id, FAILURE_TAG, redact(failed + (": re-run the same command to resume" if killed else ""))
        )
        client.set_terminated(parent_id, "KILLED" if killed else "FAILED")
        return
    objective = results["objective"]
    for state, n in results["counts"].items():
        client.log_metric(parent_id, f"trials_{state.lower()}", n)
    tags = {
        "summary": ", ".join(f"{n} {s}" for s, n in results["counts"].items()),
        "n_trials": str(results["n_trials"]),
    }
    if "best_value" in results:
        client.log_metric(parent_id, f"best_run/{objective}", results["best_value"])  # not among the children's
        tags["best_trial"] = str(results["best_trial"])
        tags.update({f"best_params.{k}": str(v) for k, v in results["best_params"].items()})
    for key, value in tags.items():
        client.set_tag(parent_id, key, value)
    if results_file:
        client.log_artifact(parent_id, str(results_file))
    for name, fig in study_plots(study, distributions or {}, objective):
        client.log_figure(parent_id, fig, f"plots/{name}.png")
        plots.close(fig)


def study_plots(study, distributions, objective: str):
    """Optuna's own matplotlib plots: history, objective against LR (log x), importances, parallel
    coordinates."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    figures = [("optimization_history", lambda: ovm.plot_optimization_history(study, target_name=objective))]
    lr = next((k for k in distributions if k.endswith("lr")), None)
    if lr:
        figures.append(
            (f"objective_vs_{lr.replace('.', '_')}", lambda: ovm.plot_slice(study, params=[lr], target_name=objective))
        )
    if len(distributions) >= 2 and len(complete) >= 2:
        figures.append(("param_importances", lambda: ovm.plot_param_importances(study, target_name=objective)))
        figures.append(("parallel_coordinate", lambda: ovm.plot_parallel_coordinate(study, target_name=objective)))
    for name, make in figures:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = make()
        except Exception as e:  # e.g. importances with a constant objective
            log.warning("could not plot %s: %s", name, e)
            continue
        ax = ax.flat[0] if hasattr(ax, "flat") else ax
        if (
            name.startswith("objective_vs")
            and isinstance(distributions.get(lr), optuna.distributions.FloatDistribution)
            and distributions[lr].log
        ):
            ax.set_xscale("log")
        yield name, ax.figure
