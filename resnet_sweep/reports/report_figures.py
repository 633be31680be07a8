"""The report's figures: test accuracy against the learning rate (with the seeds' spread), accuracy
and loss against the learning rate per optimizer, and the best runs' learning curves. Rows are
``report_rows.Row``s."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from mlflow.tracking import MlflowClient

from resnet_sweep.config import objective as objectives


def seeds_per_point(group: list) -> dict:
    counts: dict[tuple, int] = defaultdict(int)
    for r in group:
        counts[(r.optimizer, r.lr)] += 1
    return counts


def lr_axis(ax, lrs) -> None:
    """A log learning-rate axis that holds ``lrs``: a decade either side of a single one (matplotlib
    warns of identical limits otherwise), 1e-5 to 1 when there are none."""
    ax.set_xscale("log")
    lrs = sorted({lr for lr in lrs if lr and lr > 0})
    if len(lrs) <= 1:
        ax.set_xlim(*((lrs[0] / 10, lrs[0] * 10) if lrs else (1e-5, 1.0)))


def legend(ax, **kwargs) -> None:
    """The legend, where something is labelled (matplotlib warns of an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def acc_vs_lr_figure(rows: list):
    """Test accuracy against LR (log x), one line per backbone/head/optimizer, error bars over seeds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lines: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.status == "FINISHED" and r.test_acc is not None:
            lines[(r.backbone, r.head, r.optimizer)][r.lr].append(100 * r.test_acc)
    for (backbone, head, optimizer), points in sorted(lines.items()):
        lrs = sorted(points)
        means = [statistics.fmean(points[lr]) for lr in lrs]
        stds = [statistics.stdev(points[lr]) if len(points[lr]) > 1 else 0.0 for lr in lrs]
        ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=f"{backbone} {head} {optimizer}")
    lr_axis(ax, [lr for points in lines.values() for lr in points])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    legend(ax, fontsize=8)
    fig.tight_layout()
    return fig


def metrics_vs_lr_figure(rows: list):
    """Test accuracy (top) and test loss (bottom) against LR (log x), one column per optimizer, one
    line per backbone/head (what trains), error bars over seeds: the study's hand-drawn figure."""
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "FINISHED" and r.test_acc is not None]
    optimizers = sorted({r.optimizer for r in done}) or ["-"]
    fig, axes = plt.subplots(
        2, len(optimizers), figsize=(5 * len(optimizers) + 1, 7), squeeze=False, sharex=True, layout="constrained"
    )
    for col, optimizer in enumerate(optimizers):
        lines: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
        for r in done:
            if r.optimizer == optimizer:
                lines[(r.backbone, r.head, r.trains)][r.lr].append(r)
        for row, (label, value) in enumerate(
            (("test accuracy (%)", lambda r: 100 * r.test_acc), ("test loss", lambda r: r.test_loss))
        ):
            ax = axes[row][col]
            for (backbone, head, trains), points in sorted(lines.items()):
                lrs = sorted(points)
                values = [[value(r) for r in points[lr] if value(r) is not None] for lr in lrs]
                means = [statistics.fmean(v) if v else math.nan for v in values]
                stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                name = f"{backbone} {head}" + ("" if trains == "head" else f" ({trains})")
                ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=name)
            lr_axis(ax, [lr for points in lines.values() for lr in points])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(optimizer)
                legend(ax, fontsize=8)
            else:
                ax.set_xlabel("learning rate")
    return fig


def curves_figure(client: MlflowClient, rows: list, objective: str):
    """Validation loss and accuracy per epoch of the best run of each backbone/head."""
    import matplotlib.pyplot as plt

    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if r.status == "FINISHED":
            groups[(r.backbone, r.head)].append(r)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for _, group in sorted(groups.items()):
        best = objectives.best(group, lambda r: r.objective, objective)
        if best is None:
            continue
        for ax, metric, scale in ((ax_loss, "valid/loss", 1), (ax_acc, "valid/acc", 100)):
            history = sorted(client.get_metric_history(best.run_id, metric), key=lambda m: m.step)
            ax.plot([m.step for m in history], [scale * m.value for m in history], marker=".", label=best.run_name)
    ax_loss.set_ylabel("valid loss")
    ax_acc.set_ylabel("valid accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        legend(ax, fontsize=7)
    fig.tight_layout()
    return fig
