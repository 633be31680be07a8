"""Losses and metrics of a classifier with two classes (one logit, the study's BCE) or more (N logits,
cross-entropy): class weights, torchmetrics' tile-level metrics, the confusion matrix, and the
slide/patient-level results aggregated from tile probabilities (``data.group``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from resnet_sweep.config import checks
from resnet_sweep.core.errors import UserError


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(second class) from one logit each (sigmoid); one probability per class from C logits
    (softmax): what training measures and what ``models.ProbabilityModel`` serves."""
    return torch.sigmoid(logits) if logits.dim() == 1 else torch.softmax(logits, dim=-1)


def criterion(num_classes: int, reduction: str = "mean", weight: list[float] | None = None) -> nn.Module:
    """Two classes: the study's BCE on one logit; three or more: cross-entropy on N logits. ``weight``
    (one per class): two classes weigh the positive class by ``pos_weight = w2 / w1``; three or more
    take them as cross-entropy's class weights (a weighted mean over the batch)."""
    if num_classes == 2:
        pos_weight = None if weight is None else torch.tensor(weight[1] / weight[0])
        return nn.BCEWithLogitsLoss(reduction=reduction, pos_weight=pos_weight)
    return nn.CrossEntropyLoss(reduction=reduction, weight=None if weight is None else torch.tensor(weight))


def class_weights(choice, counts: list[int], classes: list[str]) -> list[float] | None:
    """``loss.class_weight`` for the training split's ``counts`` per class: none -> None; balanced ->
    n / (classes x count) per class; a list -> itself, one weight per class folder."""
    choice = checks.class_weight({"class_weight": choice})
    if choice == "none":
        return None
    if choice == "balanced":
        return [sum(counts) / (len(counts) * c) for c in counts]
    if len(choice) != len(classes):
        raise UserError(
            f"loss.class_weight={[round(w, 6) for w in choice]}: {len(choice)} weight(s) for {len(classes)} "
            f"classes ({', '.join(classes)}); give one per class folder, in this order"
        )
    return choice


def targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """What the loss compares the logits with: 0./1. for BCE, class indices for cross-entropy."""
    return y.float() if num_classes == 2 else y.long()


def class_metrics(num_classes: int) -> dict:
    """acc, balanced_acc (mean per-class recall), auroc (macro one-vs-rest for N >= 3), f1 (macro for
    N >= 3), on probabilities (``probabilities``) and integer labels."""
    c = torchmetrics.classification
    if num_classes == 2:
        return {
            "acc": c.BinaryAccuracy(),
            "auroc": c.BinaryAUROC(),
            "f1": c.BinaryF1Score(),
            "balanced_acc": _BinaryBalancedAccuracy(),
        }
    return {
        "acc": c.MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "auroc": c.MulticlassAUROC(num_classes=num_classes, average="macro"),
        "f1": c.MulticlassF1Score(num_classes=num_classes, average="macro"),
        "balanced_acc": c.MulticlassAccuracy(num_classes=num_classes, average="macro"),
    }


class _BinaryBalancedAccuracy(torchmetrics.classification.MulticlassAccuracy):
    """Mean recall of the two classes, from P(second class) thresholded at 0.5."""

    def __init__(self):
        super().__init__(num_classes=2, average="macro")

    def update(self, probs, y):
        super().update((probs >= 0.5).long(), y)


def confusion(num_classes: int):
    c = torchmetrics.classification
    return c.BinaryConfusionMatrix() if num_classes == 2 else c.MulticlassConfusionMatrix(num_classes=num_classes)


def group_scores(probs: torch.Tensor, groups: list[str], num_classes: int, aggregate: str = "mean") -> list[tuple]:
    """Each group's score per class from its tiles' probabilities (``probabilities``, in ``probs``'
    dtype): their mean (``mean``) or their share of tile votes (``majority``); its prediction the
    second class at score >= 0.5 (two classes) or the best score. -> ``(group, tile indices, scores,
    predicted)`` per group, in first-seen order. Training's slide metrics and ``resnet-sweep predict
    --group`` share this rule."""
    per_class = torch.stack([1 - probs, probs], 1) if probs.dim() == 1 else probs
    tile_pred = (probs >= 0.5).long() if probs.dim() == 1 else probs.argmax(1)
    votes = torch.nn.functional.one_hot(tile_pred, per_class.shape[1]).to(probs.dtype)
    members: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    out = []
    for key, idx in members.items():
        score = (per_class[idx] if aggregate == "mean" else votes[idx]).mean(0)
        out.append((key, idx, score, int(score[1] >= 0.5) if num_classes == 2 else int(score.argmax())))
    return out


def group_results(
    probs: torch.Tensor, labels: torch.Tensor, groups: list[str], num_classes: int, aggregate: str = "mean"
):
    """Slide/patient results (``data.group``) from tile probabilities in loader order, each group
    scored and predicted by ``group_scores``. -> (metrics: acc, balanced_acc, auroc, f1 as ``class_metrics`` on the groups, and n: groups;
    rows: one per group in first-seen order: group, class index, tiles, scores per class, predicted)."""
    probs, labels = probs.detach().float().cpu(), labels.detach().long().cpu()
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} tiles")
    rows, scores = [], []
    for key, idx, score, predicted in group_scores(probs, groups, num_classes, aggregate):
        rows.append(
            {
                "group": key,
                "class": int(labels[idx[0]]),
                "tiles": len(idx),
                "scores": score.tolist(),
                "predicted": predicted,
            }
        )
        scores.append(score)
    scores_t, truth = torch.stack(scores), torch.tensor([r["class"] for r in rows])
    metrics = torchmetrics.MetricCollection(class_metrics(num_classes))
    metrics.update(scores_t[:, 1] if num_classes == 2 else scores_t, truth)
    out = {k: v.item() for k, v in metrics.compute().items()}
    out["n"] = len(rows)
    return out, rows


def binary_predictions(logits: torch.Tensor, batch: int) -> torch.Tensor:
    """The class torchmetrics' ``BinaryAccuracy`` reads from one logit each (how the two-class accuracy
    has always been read), batch by batch along the last dimension (``batch`` values each; any leading
    dimensions: several heads): a batch whose values all lie in [0, 1] is taken as probabilities, any
    other goes through the sigmoid; then > 0.5. On the device, without a sync."""
    n = logits.shape[-1]
    pad = (-n) % batch
    batches = F.pad(logits, (0, pad), value=0.5).reshape(*logits.shape[:-1], -1, batch)
    as_probs = ((batches >= 0) & (batches <= 1)).all(-1, keepdim=True)
    probs = torch.where(as_probs, batches, torch.sigmoid(batches))
    return (probs > 0.5).reshape(*logits.shape[:-1], -1)[..., :n]


def binary_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Right answers of one batch of one logit each (``binary_predictions``)."""
    return (binary_predictions(logits, logits.shape[-1]) == y.bool()).sum()


class Meter:
    """Mean loss and accuracy over an epoch, summed on the device and read once (``compute``): a step
    waits for nothing. ``full`` adds balanced accuracy and AUROC (what validation measures, so either
    can be the objective), ``groups`` (one per tile, in loader order) the slide-level metrics
    (``group_results``): from the epoch's probabilities, kept on the device until ``compute``. A
    non-finite loss is noted on the device too (``non_finite``), for the caller to check once."""

    def __init__(self, device, num_classes: int = 2, full: bool = False, groups=None, aggregate: str = "mean"):
        self.num_classes, self.groups, self.aggregate, self.full = num_classes, groups, aggregate, full
        self.probs, self.labels = [], []
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.n = 0
        self.first_bad = torch.zeros((), dtype=torch.int8, device=device)  # 0, or the first bad loss: 1 NaN, 2 inf

    def update(self, loss, logits, y):
        loss, logits = loss.detach().float(), logits.detach().float()
        kind = torch.isnan(loss).to(torch.int8) + 2 * torch.isinf(loss).to(torch.int8)
        self.first_bad = torch.where(self.first_bad == 0, kind, self.first_bad)
        self.loss_sum += loss * y.numel()  # the batch's mean loss, weighed by its size (torchmetrics' MeanMetric)
        self.n += y.numel()
        if self.num_classes == 2:
            self.correct += binary_correct(logits, y)
        else:
            self.correct += (logits.argmax(-1) == y).sum()
        if self.full or self.groups is not None:
            self.probs.append(probabilities(logits))
            self.labels.append(y)

    def non_finite(self) -> str | None:
        """'NaN' or 'inf' when a loss of the epoch was not finite (the first such), else None: one sync."""
        return {0: None, 1: "NaN", 2: "inf"}[int(self.first_bad)]

    def compute(self, prefix: str) -> dict:
        n = max(self.n, 1)
        out = {f"{prefix}/loss": (self.loss_sum / n).item(), f"{prefix}/acc": (self.correct.float() / n).item()}
        if not self.probs:
            return out
        probs, labels = torch.cat(self.probs), torch.cat(self.labels)
        if self.full:
            metrics = class_metrics(self.num_classes)
            more = torchmetrics.MetricCollection({k: metrics[k] for k in ("balanced_acc", "auroc")}).to(probs.device)
            more.update(probs, labels.long())
            out.update({f"{prefix}/{k}": v.item() for k, v in more.compute().items()})
        if self.groups is not None:
            slide, _ = group_results(probs.cpu(), labels.cpu(), self.groups, self.num_classes, self.aggregate)
            out.update({f"{prefix}/slide/{k}": v for k, v in slide.items()})
        return out
