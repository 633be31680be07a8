"""The report's Markdown tables in the study's format, one per backbone and head, and the whole
report's text (``markdown``).

The best row of each table is chosen by the sweep objective on *validation* and set in bold; test
figures stand beside it but never choose it (choosing on them would leak the test split).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from resnet_sweep.config import objective as objectives
from resnet_sweep.config.naming import lr_label
from resnet_sweep.reports.report_figures import seeds_per_point
from resnet_sweep.reports.report_rows import Row


def acc_text(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}%"


def loss_text(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.3f}"


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f}{unit} ± {std:.{digits}f}{unit}"


def _bold(cells: list[str]) -> list[str]:
    return [f"**{c}**" for c in cells]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


STUDY_HEADER = ["Optimizer", "Learning rate", "Momentum", "Epochs (best)", "Batch size", "Test loss", "Test acc"]


def objective_header(objective: str) -> str:
    """The column of the value a table's best row is chosen on: ``Valid loss (best epoch)``."""
    name = objective.removeprefix("valid/").replace("_", " ").replace("/", " ").replace("auroc", "AUROC")
    return f"Valid {name} (best epoch)"


def objective_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


MACRO_HEADER = ["Test balanced acc", "Test AUROC", "Test F1"]  # beside the study's columns
SLIDE_HEADER = ["Slide acc", "Slide balanced acc", "Slide AUROC"]  # runs with data.group


def score_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def study_table(rows: list[Row], objective: str) -> str:
    """One row per run, the study's columns and the objective they are chosen on (before the test
    figures); sorted by optimizer, then learning rate."""
    rows = sorted(rows, key=lambda r: (r.optimizer, r.lr))
    best = objectives.best([r for r in rows if r.status == "FINISHED"], lambda r: r.objective, objective)
    slides = any(r.test_slide_acc is not None for r in rows)
    out = []
    for r in rows:
        epochs = f"{r.max_epochs} ({r.best_epoch})" if r.best_epoch is not None else f"{r.max_epochs} (-)"
        cells = [
            r.optimizer.upper() if r.optimizer == "sgd" else r.optimizer.capitalize(),
            lr_label(r.lr),
            r.momentum,
            epochs,
            str(r.batch_size),
            objective_text(r.objective),
            loss_text(r.test_loss),
            acc_text(r.test_acc),
        ]
        if r.status != "FINISHED":
            cells[-1] = f"{r.status.lower()}"
        cells += [acc_text(r.test_balanced_acc), score_text(r.test_auroc), score_text(r.test_f1)]
        if slides:
            cells += [acc_text(r.test_slide_acc), acc_text(r.test_slide_balanced_acc), score_text(r.test_slide_auroc)]
        out.append(_bold(cells) if r is best else cells)
    header = [*STUDY_HEADER[:5], objective_header(objective), *STUDY_HEADER[5:]]
    return md_table(header + MACRO_HEADER + (SLIDE_HEADER if slides else []), out)


SEED_HEADER = [
    "Optimizer",
    "Learning rate",
    "Epochs",
    "Seeds",
    "Test acc per seed",
    "Test acc mean ± std",
    "Test loss mean ± std",
]


def seed_table(rows: list[Row], objective: str) -> str:
    """Repeated seeds: one row per (optimizer, LR) with the per-seed accuracies and mean ± std."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r.status == "FINISHED":
            groups[(r.optimizer, r.lr)].append(r)
    means = {
        k: statistics.fmean([r.objective for r in v if r.objective is not None] or [math.nan])
        for k, v in groups.items()
    }
    best = objectives.best(list(groups), lambda k: means[k], objective)
    out = []
    for key in sorted(groups):
        runs = sorted(groups[key], key=lambda r: r.seed)
        accs = [r.test_acc for r in runs if r.test_acc is not None]
        losses = [r.test_loss for r in runs if r.test_loss is not None]
        chosen_on = [r.objective for r in runs if r.objective is not None]
        cells = [
            key[0].upper() if key[0] == "sgd" else key[0].capitalize(),
            lr_label(key[1]),
            str(runs[0].max_epochs),
            ", ".join(str(r.seed) for r in runs),
            mean_std(chosen_on, 1, 4),
            ", ".join(f"{100 * a:.2f}" for a in accs),
            mean_std(accs, 100, 2, "%"),
            mean_std(losses, 1, 3),
        ]
        out.append(_bold(cells) if key == best else cells)
    return md_table([*SEED_HEADER[:4], f"{objective_header(objective)} mean ± std", *SEED_HEADER[4:]], out)


def imagenet_table(backbones: dict[str, str]) -> str:
    """acc@1, acc@5, parameters and file size from torchvision's weights metadata."""
    from torchvision.models import get_model_weights

    out = []
    for name, enum_name in sorted(backbones.items()):
        try:
            weights = get_model_weights(name)[enum_name]
        except (KeyError, ValueError):
            continue
        meta = weights.meta
        metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
        size = meta.get("_file_size")
        out.append(
            [
                name,
                f"{weights}".split(".")[-1],
                f"{metrics.get('acc@1', float('nan')):.3f}",
                f"{metrics.get('acc@5', float('nan')):.3f}",
                f"{meta.get('num_params', 0) / 1e6:.1f}M",
                f"{size:.1f} MB" if size else "-",
            ]
        )
    return md_table(["Backbone", "Weights", "ImageNet acc@1", "acc@5", "Params", "Size"], out)


def best_learning_table(rows: list[Row], objective: str) -> str:
    out = []
    by_backbone: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.status == "FINISHED":
            by_backbone[r.backbone].append(r)
    for backbone in sorted(by_backbone, key=lambda b: (len(b), b)):
        best = objectives.best(by_backbone[backbone], lambda r: r.objective, objective)
        if best is None:
            continue
        out.append(
            [
                backbone,
                best.head if best.trains == "head" else f"{best.head} (trained: {best.trains})",
                best.optimizer,
                lr_label(best.lr),
                str(best.seed),
                f"{best.max_epochs} ({best.best_epoch})",
                f"{best.objective:.4f}",
                loss_text(best.test_loss),
                acc_text(best.test_acc),
            ]
        )
    return md_table(
        [
            "Backbone",
            "Head",
            "Optimizer",
            "Learning rate",
            "Seed",
            "Epochs (best)",
            objective_header(objective),
            "Test loss",
            "Test acc",
        ],
        out,
    )


BEST_HEADING = "## Best run per backbone"
IMAGENET_HEADING = "## The backbones on ImageNet (torchvision's figures)"


def random_weights(rows: list[Row]) -> bool:
    return any(r.weights.startswith("random") for r in rows)


def markdown(rows: list[Row], parent, objective: str) -> str:
    """The whole report as Markdown: what it holds, the best run per backbone, then one table per
    backbone and head, the backbones' ImageNet figures (pretrained weights only), the runs that did
    not finish."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r.backbone, r.head, r.trains)].append(r)
    titles = {
        key: f"{key[0]} with a {key[1]} head" + ("" if key[2] == "head" else f", training {key[2]}") for key in groups
    }
    random = random_weights(rows)
    failed = [r for r in rows if r.status != "FINISHED"]
    contents = ["the best run per backbone", *(f"{t} ({len(groups[k])} runs)" for k, t in sorted(titles.items()))]
    contents += [] if random else ["the backbones' ImageNet figures"]
    contents += [f"{len(failed)} runs that did not finish"] if failed else []
    parts = [
        f"# Sweep report: {parent.info.run_name}",
        "",
        f"{len(rows)} runs. Below: {'; '.join(contents)}. Best rows (**bold**) are chosen on validation "
        f"({objective}, its column in each table); test figures stand beside them and choose nothing.",
        "",
    ]
    if random:
        weights = sorted({r.weights for r in rows})
        parts += [
            f"> **Backbone weights: {', '.join(weights)}. Not transfer learning: these runs start from "
            "random weights, and the backbones' ImageNet figures do not apply to them.**",
            "",
        ]
    for counts in sorted({r.class_counts for r in rows if r.class_counts}):
        parts += [f"Tiles per class: {counts}.", ""]
    parts += [BEST_HEADING, "", best_learning_table(rows, objective), ""]
    for key, group in sorted(groups.items()):
        repeated = max(seeds_per_point(group).values()) > 1
        parts += [f"## {titles[key]}", ""]
        parts += [seed_table(group, objective) if repeated else study_table(group, objective), ""]
    if not random:
        parts += [IMAGENET_HEADING, "", imagenet_table({r.backbone: r.imagenet_weights for r in rows}), ""]
    if failed:
        parts += ["## Runs that did not finish", ""]
        parts += [f"- {r.run_name}: {r.status.lower()}" for r in failed] + [""]
    return "\n".join(parts)
