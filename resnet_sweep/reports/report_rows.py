"""A sweep's child run as a row of its report: its params, metrics and tags in MLflow read once
into a ``Row`` (what every table, figure and the CSV of the report is made from)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    run_id: str
    run_name: str
    status: str
    backbone: str
    head: str
    optimizer: str
    lr: float
    momentum: str
    max_epochs: int
    best_epoch: int | None
    batch_size: int
    seed: int
    objective: float | None  # best/<objective> of the run (validation)
    test_loss: float | None
    test_acc: float | None
    weights: str
    imagenet_weights: str
    trains: str = "head"  # the run's `trains` tag (naming.what_trains): head | all | head + ...
    test_balanced_acc: float | None = None  # macro for three or more classes
    test_auroc: float | None = None  # macro one-vs-rest for three or more classes
    test_f1: float | None = None  # macro for three or more classes
    class_counts: str = ""  # "train: a 18, b 2; valid: ...; test: ..." from the run's class_counts.* tags
    test_slide_acc: float | None = None  # per slide/patient (data.group)
    test_slide_balanced_acc: float | None = None
    test_slide_auroc: float | None = None


def momentum_of(params: dict) -> str:
    if "optimizer.momentum" in params:
        return params["optimizer.momentum"]
    if "optimizer.betas" in params:
        return "(" + params["optimizer.betas"].strip("[]") + ")"
    return "-"


def to_row(run, objective: str) -> Row:
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    return Row(
        run_id=run.info.run_id,
        run_name=run.info.run_name,
        status=run.info.status,
        backbone=p.get("backbone.name", "?"),
        head=p.get("head.name", "?"),
        optimizer=t.get("optimizer", "?"),
        lr=float(p.get("optimizer.lr", "nan")),
        momentum=momentum_of(p),
        max_epochs=int(p.get("trainer.max_epochs", 0)),
        best_epoch=int(m["best_epoch"]) if "best_epoch" in m else None,
        batch_size=int(p.get("trainer.batch_size", 0)),
        seed=int(p.get("seed", 0)),
        objective=m.get(f"best/{objective}"),
        test_loss=m.get("test/loss"),
        test_acc=m.get("test/acc"),
        weights=t.get("weights_source", "?"),
        imagenet_weights=p.get("backbone.imagenet_weights", ""),
        trains=t.get("trains", "head"),
        test_balanced_acc=m.get("test/balanced_acc"),
        test_auroc=m.get("test/auroc"),
        test_f1=m.get("test/f1"),
        test_slide_acc=m.get("test/slide/acc"),
        test_slide_balanced_acc=m.get("test/slide/balanced_acc"),
        test_slide_auroc=m.get("test/slide/auroc"),
        class_counts="; ".join(
            f"{s}: {t[f'class_counts.{s}']}" for s in ("train", "valid", "test") if f"class_counts.{s}" in t
        ),
    )
