"""The sweep objective: which way is better, and the best of several. One spelling of the direction,
Optuna's (``minimize`` / ``maximize``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

from resnet_sweep.core.errors import UserError

PER_EPOCH = ("loss", "acc", "balanced_acc", "auroc")  # the validation metrics measured at every epoch

T = TypeVar("T")


def direction(objective: str) -> str:
    """valid/loss -> minimize; valid/acc, valid/balanced_acc, valid/auroc -> maximize. Other metrics
    (f1, any test/ metric) are not measured on validation every epoch, so they cannot pick an epoch:
    refused in one line."""
    split, _, metric = str(objective).partition("/")
    slide = metric.startswith("slide/")  # valid/slide/...: per slide or patient (data.group)
    metric = metric.removeprefix("slide/")
    if split != "valid" or metric not in PER_EPOCH or (slide and metric == "loss"):
        raise UserError(
            f"objective={objective}: the sweep objective is a validation metric measured every epoch: "
            "valid/loss (minimised), valid/acc, valid/balanced_acc or valid/auroc (maximised), or their "
            "valid/slide/ forms with data.group"
        )
    return "minimize" if metric == "loss" else "maximize"


def better(a: float, b: float, objective: str) -> bool:
    """Whether ``a`` is better than ``b`` on ``objective``."""
    return a < b if direction(objective) == "minimize" else a > b


def best(items: Iterable[T], value: Callable[[T], float | None], objective: str | Callable[[T], str]) -> T | None:
    """The item with the best finite ``value(item)`` on ``objective`` (a name, or the item's own
    objective as ``objective(item)``); None when no item has one."""
    scored = []
    for item in items:
        v = value(item)
        if v is None or not math.isfinite(v):
            continue
        name = objective(item) if callable(objective) else objective
        scored.append((v if direction(name) == "minimize" else -v, item))
    return min(scored, key=lambda s: s[0])[1] if scored else None
