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
    fig.tight_layout()
    return fig


def confusion_matrix(matrix: list[list[int]], classes: list[str], title: str):
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=14)
    ax.set_xticks([0, 1], classes, rotation=15)
    ax.set_yticks([0, 1], classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
