"""The sweep's interactive dashboard: one self-contained HTML file (``dashboard_page``) logged on the
sweep's parent run as ``dashboard.html``: the figures of its child runs in MLflow
(``dashboard_figures``), and for an Optuna study, Optuna's own plots."""

from __future__ import annotations

import logging
import warnings

from mlflow.tracking import MlflowClient

from resnet_sweep.config import objective as objectives
from resnet_sweep.reports.dashboard_figures import against_keys, curves, integer_ticks, over_seeds, parallel_coordinates
from resnet_sweep.reports.dashboard_page import Section, to_html
from resnet_sweep.reports.swept import swept_keys
from resnet_sweep.tracking.lookup import best_run

log = logging.getLogger(__name__)

FILE = "dashboard.html"


def optuna_sections(study, objective: str) -> list[Section]:
    """Optuna's own plots of the study: history, intermediate values, parallel coordinates, contour,
    slice and importances (contour and importances with two parameters or more)."""
    import optuna
    import optuna.visualization as ov

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return [Section("Optuna", "No complete trial yet: Optuna's plots need one.")]
    names = sorted({p for t in complete for p in t.params})
    several = len(names) >= 2 and len(complete) >= 2
    plots = [
        ("Optuna: optimization history", "Each trial's objective and the best so far.", ov.plot_optimization_history),
        (
            "Optuna: intermediate values",
            "The objective each trial reported per epoch (what the pruner saw).",
            ov.plot_intermediate_values,
        ),
        ("Optuna: slice", "The objective against each parameter; colour is the trial number.", ov.plot_slice),
        ("Optuna: parallel coordinates", "Trials across the parameters.", ov.plot_parallel_coordinate),
    ]
    if several:
        plots += [
            ("Optuna: contour", "The objective over pairs of parameters.", ov.plot_contour),
            ("Optuna: parameter importances", "fANOVA importance of each parameter.", ov.plot_param_importances),
        ]
    sections = []
    for title, note, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kwargs = {} if plot is ov.plot_intermediate_values else {"target_name": objective}
                figure = plot(study, **kwargs)
            if plot in (ov.plot_optimization_history, ov.plot_intermediate_values):
                integer_ticks(figure, max((max(t.x) for t in figure.data if t.x), default=None))
            sections.append(Section(title, note, figure))
        except Exception as e:  # e.g. importances of a constant objective
            log.warning("dashboard: could not plot %s: %s", title, e)
    return sections


def sections(client: MlflowClient, runs, objective: str, study=None) -> list[Section]:
    """The dashboard's sections for a sweep's child runs (and its Optuna study)."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    chosen = best_run(finished, objective)
    keys = swept_keys(finished or runs)
    out = []
    if keys and finished:
        out += [against_keys(finished, keys, objective, chosen), parallel_coordinates(finished, keys, objective)]
    else:
        out.append(Section("Swept keys", "The finished runs of this sweep share every parameter: nothing to compare."))
    out.append(curves(client, runs, keys, objective, chosen))
    if finished:
        out.append(over_seeds(finished, keys, objective))
    if study is not None:
        out += optuna_sections(study, objective)
    return out


def build(client: MlflowClient, parent, runs, *, study=None) -> str:
    """The dashboard of the sweep whose parent run is ``parent`` and child runs ``runs``."""
    objective = parent.data.tags.get("objective", "valid/loss")
    chosen = best_run([r for r in runs if r.info.status == "FINISHED"], objective)
    summary = f"{len(runs)} runs; objective {objective} ({objectives.direction(objective)}d on validation)" + (
        f"; chosen run {chosen.info.run_name} ({objective} {chosen.data.metrics[f'best/{objective}']:.4g})"
        if chosen
        else "; no run finished with a value"
    )
    if "summary" in parent.data.tags:
        summary += f". {parent.data.tags['summary']}"
    return to_html(f"Sweep dashboard: {parent.info.run_name}", summary, sections(client, runs, objective, study))
