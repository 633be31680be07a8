"""Figures logged with every run (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def learning_curves(epochs: list[dict], best_epoch: int, title: str):
    """Train/valid loss and accuracy per epoch, the best epoch marked."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    steps = list(range(len(epochs)))
    for split, style in (("train", "-o"), ("valid", "-s")):
        ax_loss.plot(steps, [m[f"{split}/loss"] for m in epochs], style, label=split, markersize=3)
        ax_acc.plot(steps, [100 * m[f"{split}/acc"] for m in epochs], style, label=split, markersize=3)
    for ax, name in ((ax_loss, "BCE loss"), (ax_acc, "accuracy (%)")):
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.88, wspace=0.22)  # tight_layout's, a draw less
    return fig


def confusion_matrix(matrix: list[list[int]], classes: list[str], title: str):
    """Counts and row percentages (of each true class), cells coloured by the row percentage so that
    an imbalanced test split reads right; white numbers on dark cells, labels inside the figure."""
    n = len(classes)
    side = max(5.0, 0.9 * n + 3)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), layout="constrained")
    totals = [max(sum(row), 1) for row in matrix]
    share = [[v / t for v in row] for row, t in zip(matrix, totals)]
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    size = 13 if n <= 4 else 10 if n <= 8 else 7
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            colour = "white" if share[i][j] > 0.5 else "black"
            text = f"{int(v)}\n{100 * share[i][j]:.1f}%"
            ax.text(j, i, text, ha="center", va="center", fontsize=size, color=colour)
    ticks = list(range(n))
    ax.set_xticks(ticks, classes, rotation=0 if n <= 3 else 45, ha="center" if n <= 3 else "right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row % of the class)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return fig


def close(fig) -> None:
    plt.close(fig)
