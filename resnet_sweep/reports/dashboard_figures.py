"""The dashboard's figures of a sweep's runs (plotly): every swept key against the objective and
the test metrics (log axes where a key's values span decades, the chosen run marked), parallel
coordinates over the swept keys, every run's validation curves coloured by the main swept value,
mean ± std over seeds grouped by the other keys."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from mlflow.tracking import MlflowClient

from resnet_sweep.config import objective as objectives
from resnet_sweep.reports.dashboard_page import Section
from resnet_sweep.reports.swept import SEED, Key, colour, colour_scale, main_key


def _short(name: str) -> str:
    return name.removeprefix("optimizer.").removeprefix("backbone.").removeprefix("trainer.")


def _axis(key: Key, run_id: str):
    return key.number(run_id) if key.numeric else key.values[run_id]


def _ticks(key: Key) -> tuple[list[float], list[str]]:
    """Tick positions (log10 for a log key) and labels: every value where there are few, else decades
    (a log key) or five even steps."""
    levels = [float(v) for v in key.levels()]
    scale = math.log10 if key.log else float
    if len(levels) <= 6:
        return [scale(v) for v in levels], [f"{v:g}" for v in levels]
    if key.log:
        decades = range(math.floor(scale(levels[0])), math.ceil(scale(levels[-1])) + 1)
        return [float(d) for d in decades], [f"{10.0**d:g}" for d in decades]
    steps = [levels[0] + (levels[-1] - levels[0]) * i / 4 for i in range(5)]
    return steps, [f"{v:.3g}" for v in steps]


def integer_ticks(fig, last: float | None, **where) -> None:
    """Whole-number ticks (epochs, trial numbers) on the x axes ``where`` selects."""
    if last is not None and last >= 0:
        fig.update_xaxes(dtick=max(1, math.ceil(last / 10)), **where)


def _metric_label(metric: str) -> str:
    return metric.replace("best/", "").replace("/", " ")


def against_keys(runs, keys: list[Key], objective: str, chosen) -> Section:
    """One row per swept key, one column per metric (the objective, test accuracy, test loss)."""
    from plotly.subplots import make_subplots

    metrics = [f"best/{objective}", "test/acc", "test/loss"]
    shown = [k for k in keys if k.name != SEED] or keys
    fig = make_subplots(
        rows=len(shown),
        cols=len(metrics),
        subplot_titles=[f"{_metric_label(m)} vs {_short(k.name)}" for k in shown for m in metrics],
        vertical_spacing=min(0.12, 0.5 / max(len(shown), 1)),
    )
    main = main_key(keys)
    for row, key in enumerate(shown, start=1):
        for col, metric in enumerate(metrics, start=1):
            done = [r for r in runs if metric in r.data.metrics]
            fig.add_scatter(
                x=[_axis(key, r.info.run_id) for r in done],
                y=[r.data.metrics[metric] for r in done],
                mode="markers",
                marker=dict(size=9, color=[colour(main, r.info.run_id) for r in done], line=dict(width=0)),
                text=[r.info.run_name for r in done],
                hovertemplate="%{text}<br>" + _short(key.name) + " %{x}<br>" + _metric_label(metric) + " %{y:.4g}",
                name="runs",
                showlegend=False,
                row=row,
                col=col,
            )
            if chosen is not None and metric in chosen.data.metrics:
                fig.add_scatter(
                    x=[_axis(key, chosen.info.run_id)],
                    y=[chosen.data.metrics[metric]],
                    mode="markers",
                    marker=dict(symbol="star", size=18, color="rgba(0,0,0,0)", line=dict(width=2, color="crimson")),
                    name=f"chosen on validation: {chosen.info.run_name}",
                    hovertemplate=f"chosen: {chosen.info.run_name}<extra></extra>",
                    legendgroup="chosen",
                    showlegend=row == 1 and col == 1,
                    row=row,
                    col=col,
                )
            fig.update_xaxes(
                title_text=_short(key.name),
                type="log" if key.log else None,
                exponentformat="e" if key.log else None,
                row=row,
                col=col,
            )
            if not key.numeric:
                fig.update_xaxes(type="category", categoryorder="array", categoryarray=key.levels(), row=row, col=col)
    height = 320 * len(shown) + 120
    fig.update_layout(
        height=height, margin=dict(t=110), legend=dict(orientation="h", x=0, y=1 + 60 / height, yanchor="bottom")
    )
    return Section(
        "Swept keys against the objective and the test metrics",
        f"Each point a run, coloured by {_short(main.name) if main else 'run'}; the star is the run chosen on "
        f"validation ({objective}). Test figures are shown, never used to choose.",
        fig,
    )


def parallel_coordinates(runs, keys: list[Key], objective: str) -> Section:
    """One line per run across the swept keys (log10 for keys spanning decades) to the objective."""
    import plotly.graph_objects as go

    done = [r for r in runs if f"best/{objective}" in r.data.metrics]
    dims = []
    for key in keys:
        ids = [r.info.run_id for r in done]
        if not key.numeric:
            levels = key.levels()
            dims.append(
                dict(
                    label=_short(key.name),
                    values=[levels.index(key.values[i]) for i in ids],
                    tickvals=list(range(len(levels))),
                    ticktext=levels,
                )
            )
        elif key.log:
            tickvals, ticktext = _ticks(key)
            dims.append(
                dict(
                    label=f"{_short(key.name)} (log)",
                    values=[math.log10(key.number(i)) for i in ids],
                    tickvals=tickvals,
                    ticktext=ticktext,
                )
            )
        else:
            dims.append(dict(label=_short(key.name), values=[key.number(i) for i in ids]))
    values = [r.data.metrics[f"best/{objective}"] for r in done]
    dims.append(dict(label=_metric_label(objective), values=values))
    better_low = objectives.direction(objective) == "minimize"
    fig = go.Figure(
        go.Parcoords(
            dimensions=dims,
            line=dict(
                color=values,
                colorscale="Viridis",
                reversescale=better_low,
                showscale=True,
                colorbar=dict(title=_metric_label(objective)),
            ),
        )
    )
    fig.update_layout(height=460)
    return Section(
        "Parallel coordinates",
        f"One line per finished run, coloured by {objective} (brighter is better); drag along an axis to "
        "keep only the runs in that range.",
        fig,
    )


def curves(client: MlflowClient, runs, keys: list[Key], objective: str, chosen) -> Section:
    """Every run's validation curves per epoch, coloured by the main swept value; the chosen run thick."""
    from plotly.subplots import make_subplots

    metrics = list(dict.fromkeys([objective, "valid/loss", "valid/acc"]))[:3]
    main = main_key(keys)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    for run in sorted(runs, key=lambda r: main.position(r.info.run_id) if main else 0):
        chosen_one = chosen is not None and run.info.run_id == chosen.info.run_id
        for col, metric in enumerate(metrics, start=1):
            history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
            if not history:
                continue
            fig.add_scatter(
                x=[m.step for m in history],
                y=[m.value for m in history],
                mode="lines+markers",
                marker=dict(size=4),
                line=dict(
                    color=colour(main, run.info.run_id),
                    width=4 if chosen_one else 1.5,
                    dash="solid" if run.info.status == "FINISHED" else "dot",
                ),
                name=run.info.run_name + (" (chosen)" if chosen_one else ""),
                legendgroup=run.info.run_id,
                showlegend=col == 1,
                hovertemplate=f"{run.info.run_name}<br>epoch %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="epoch")
    integer_ticks(fig, max((max(t.x) for t in fig.data if t.x and t.x[0] is not None), default=None))
    if main is not None and main.numeric:
        _colour_bar(fig, main)
    fig.update_layout(height=480)
    what = _short(main.name) + (" (log scale)" if main and main.log else "") if main else "run"
    return Section(
        "Validation curves of every run",
        f"Epoch 0 is the untrained model. Coloured by {what}; the chosen run is drawn thick, runs that did not "
        "finish dotted. Click a name in the legend to hide it, double-click to show it alone.",
        fig,
    )


def _colour_bar(fig, key: Key) -> None:
    """A colour bar for the main key: an invisible trace carrying the colour scale."""
    levels = [float(v) for v in key.levels()]
    scale = math.log10 if key.log else float
    lo, hi = scale(levels[0]), scale(levels[-1])
    if hi == lo:
        return
    tickvals, ticktext = _ticks(key)
    fig.add_scatter(
        x=[None],
        y=[None],
        mode="markers",
        showlegend=False,
        hoverinfo="skip",
        marker=dict(
            colorscale=colour_scale(),
            cmin=lo,
            cmax=hi,
            color=[lo],
            showscale=True,
            colorbar=dict(
                title=_short(key.name),
                tickvals=tickvals,
                ticktext=ticktext,
                x=1.02,
                len=0.9,
            ),
        ),
        row=1,
        col=1,
    )
    fig.update_layout(legend=dict(x=1.12))


def over_seeds(runs, keys: list[Key], objective: str) -> Section:
    """Mean ± std over seeds of the objective and test accuracy, grouped by the other swept keys."""
    from plotly.subplots import make_subplots

    seed = next((k for k in keys if k.name == SEED), None)
    if seed is None:
        return Section(
            "Mean ± std over seeds",
            "One seed per point in this sweep: add seed=0,1,2 to the sweep to see how much a result moves "
            "with the seed.",
        )
    others = [k for k in keys if k.name != SEED]
    x_key = others[0] if others else None
    line_keys = others[1:]
    metrics = [f"best/{objective}", "test/acc"]
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        line = tuple(k.values[r.info.run_id] for k in line_keys)
        x = x_key.values[r.info.run_id] if x_key else "all"
        groups[line][x].append(r)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[_metric_label(m) for m in metrics])
    for line, points in sorted(groups.items()):
        xs = sorted(points, key=lambda v: float(v) if x_key and x_key.numeric else v)
        label = ", ".join(f"{_short(k.name)}={v}" for k, v in zip(line_keys, line)) or "runs"
        for col, metric in enumerate(metrics, start=1):
            values = [[r.data.metrics[metric] for r in points[x] if metric in r.data.metrics] for x in xs]
            fig.add_scatter(
                x=[float(x) if x_key and x_key.numeric else x for x in xs],
                y=[statistics.fmean(v) if v else None for v in values],
                error_y=dict(type="data", array=[statistics.stdev(v) if len(v) > 1 else 0 for v in values]),
                customdata=[len(v) for v in values],
                mode="lines+markers",
                name=label,
                legendgroup=label,
                showlegend=col == 1,
                hovertemplate="%{x}: %{y:.4g} ± %{error_y.array:.2g} over %{customdata} seeds",
                row=1,
                col=col,
            )
            if x_key is not None:
                fig.update_xaxes(title_text=_short(x_key.name), type="log" if x_key.log else None, row=1, col=col)
    fig.update_layout(height=420)
    return Section(
        "Mean ± std over seeds",
        f"Mean and standard deviation over seeds {', '.join(seed.levels())}"
        + (f", one line per {', '.join(_short(k.name) for k in line_keys)}" if line_keys else "")
        + ".",
        fig,
    )
