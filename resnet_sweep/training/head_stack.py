"""One epoch of K heads on one feature bank, computed together: each head's batches in its own order
(its seed) and view (its epoch), one stacked forward/backward/step per batch, each head's training
and validation metrics as ``engine.train_one_epoch`` and ``engine.validate`` measure them alone. Nothing is read back to the host
inside an epoch: losses, accuracies and the divergence flags are summed on the device, read once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, multilabel_auroc

from resnet_sweep.core import faults
from resnet_sweep.data import crops
from resnet_sweep.training.hardware import autocast
from resnet_sweep.training.metrics import Meter, binary_predictions, criterion, targets
from resnet_sweep.training.stacked_heads import StackedHeads, StackedOptimizer


@dataclass
class HeadSpec:
    """One job's head as it trains alone: the real head and optimizer (restored), its bank loaders,
    its training-loss class weights and its random state (dropout)."""

    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train: object  # features.BankLoader (shuffled)
    valid: object  # features.BankLoader (in order)
    num_classes: int
    class_weight: list[float] | None
    rng_state: torch.Tensor
    groups: list | None = None
    aggregate: str = "mean"


class Diverging(Exception):
    """A head's training loss became NaN or inf during the epoch."""


class HeadStack:
    """The heads of ``specs`` (one shape, one optimizer kind, one bank and batch size) on ``device``."""

    def __init__(self, specs: list[HeadSpec], *, device: torch.device, precision: str):
        self.specs, self.device, self.precision = specs, device, precision
        self.heads = StackedHeads([s.head for s in specs], device)
        self.optimizer = StackedOptimizer(self.heads, [s.optimizer for s in specs])
        for k, spec in enumerate(specs):
            self.optimizer.load(k, spec.optimizer)
        first = specs[0]
        self.features = torch.from_numpy(np.array(first.train.features)).to(device)  # a copy: the bank is read-only
        self.labels = first.train.targets.to(device)
        self.valid_x = torch.from_numpy(np.asarray(first.valid.features, dtype=np.float32)).to(device)
        self.valid_y = first.valid.targets.to(device)
        self.batch = int(first.train.batch_size)
        self.views = int(first.train.views)
        self.num_classes = first.num_classes
        self.rng = [s.rng_state for s in specs]
        self.pos_weight, self.class_weight = _loss_weights(specs, device)

    def __len__(self) -> int:
        return len(self.specs)

    def epoch(self, epochs: list[int | None]) -> list[dict | Exception | None]:
        """Epoch ``epochs[k]`` of each head (None: the head sits this one out); epoch 0 measures
        the untrained head, epochs >= 1 train it first. Returns each head's metrics (train/* and
        valid/*), a ``Diverging`` for a head whose loss stopped being finite, or None."""
        live = [e is not None for e in epochs]
        training = torch.tensor([e is not None and e > 0 for e in epochs], device=self.device)
        train = self._train(epochs, live, training)
        valid = self._valid(live)
        out = []
        for k, e in enumerate(epochs):
            if e is None:
                out.append(None)
            elif train["bad"][k]:
                kind = "NaN" if train["bad"][k] == 1 else "inf"
                out.append(Diverging(f"loss became {kind} at epoch {e}"))
            else:
                out.append({**{key: v[k] for key, v in train.items() if key != "bad"}, **valid[k]})
        return out

    # ------------------------------------------------------------------ training pass
    def _orders(self, epochs: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.labels)
        rows, views = [], []
        for spec, e in zip(self.specs, epochs, strict=True):
            e = 0 if e is None else e
            rows.append(crops.epoch_order(spec.train.targets, spec.train.seed, e, spec.train.sampler))
            views.append(crops.view_of(e) % self.views)
        order = np.stack(rows) if rows else np.zeros((0, n), dtype=np.int64)
        return torch.from_numpy(order).to(self.device), torch.tensor(views, device=self.device)

    def _train(self, epochs, live, training) -> dict:
        order, views = self._orders(epochs)
        k, length = order.shape
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, dtype=torch.int64, device=self.device)
        bad = torch.zeros(k, dtype=torch.int8, device=self.device)
        dropout = [self.rng[i] if epochs[i] and epochs[i] > 0 else None for i in range(k)]
        any_training = any(e is not None and e > 0 for e in epochs)
        cast = autocast(self.device, self.precision)  # decided once, entered every step
        for start in range(0, length, self.batch):
            faults.check()
            idx = order[:, start : start + self.batch]
            x = self.features[views[:, None], idx] if self.features.dim() == 3 else self.features[idx]
            y = self.labels[idx]
            with torch.set_grad_enabled(any_training), cast:
                logits = self.heads.forward(x.float(), dropout=dropout if any_training else None)
            logits = _squeezed(logits.float())
            loss = self._loss(logits, y, weighted=True)
            finite = torch.isfinite(loss)
            bad = torch.where(bad == 0, (~finite).to(torch.int8) * torch.where(torch.isnan(loss), 1, 2), bad)
            if any_training:
                (loss * training).sum().backward()
                self.optimizer.step(training)
            with torch.no_grad():
                loss_sum += loss.detach() * idx.shape[1]
                correct += _correct(logits.detach(), y, self.num_classes)
        self.rng = [d if d is not None else r for d, r in zip(dropout, self.rng, strict=True)]
        bad_host = bad.cpu().tolist()
        return {
            "train/loss": (loss_sum / length).cpu().tolist(),
            "train/acc": (correct.double() / length).cpu().tolist(),
            "bad": [b if on else 0 for b, on in zip(bad_host, live, strict=True)],
        }

    def _loss(self, logits, y, *, weighted: bool) -> torch.Tensor:
        """Each head's mean loss over its batch ([K]), as ``metrics.criterion`` computes it alone."""
        if self.num_classes == 2:
            pos_weight = self.pos_weight if weighted else None
            per = F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=pos_weight, reduction="none")
            return per.mean(-1)
        nll = -torch.log_softmax(logits, -1).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
        if not weighted or self.class_weight is None:
            return nll.mean(-1)
        w = torch.gather(self.class_weight, 1, y.long())
        return (nll * w).sum(-1) / w.sum(-1)

    # ------------------------------------------------------------------ validation pass
    @torch.inference_mode()
    def _valid(self, live) -> list[dict]:
        chunks = []
        for start in range(0, len(self.valid_y), 4096):
            with autocast(self.device, self.precision):
                chunks.append(_squeezed(self.heads.forward(self.valid_x[start : start + 4096]).float()))
        logits = torch.cat(chunks, 1)
        if self.num_classes == 2 and all(s.groups is None for s in self.specs):
            return _binary_valid(logits, self.valid_y, self.batch)
        return [self._meter_valid(logits[k], self.specs[k]) if on else {} for k, on in enumerate(live)]

    def _meter_valid(self, logits: torch.Tensor, spec: HeadSpec) -> dict:
        """One head's validation through ``metrics.Meter``, batch by batch as ``engine.validate``."""
        meter = Meter(self.device, self.num_classes, full=True, groups=spec.groups, aggregate=spec.aggregate)
        loss_fn = criterion(self.num_classes).to(self.device)
        for start in range(0, len(self.valid_y), self.batch):
            part, y = logits[start : start + self.batch], self.valid_y[start : start + self.batch]
            meter.update(loss_fn(part, targets(y, self.num_classes)), part, y)
        return meter.compute("valid")


def _squeezed(logits: torch.Tensor) -> torch.Tensor:
    return logits.squeeze(-1) if logits.shape[-1] == 1 else logits


def _loss_weights(specs: list[HeadSpec], device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Two classes: each head's ``pos_weight`` ([K, 1]); more: each head's class weights ([K, C])."""
    if all(s.class_weight is None for s in specs):
        return None, None
    weights = [s.class_weight or [1.0] * max(s.num_classes, 2) for s in specs]
    if specs[0].num_classes == 2:
        return torch.tensor([[w[1] / w[0]] for w in weights], device=device), None
    return None, torch.tensor(weights, device=device)


def _correct(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    if num_classes == 2:
        return (binary_predictions(logits, logits.shape[-1]) == y.bool()).sum(-1)
    return (logits.argmax(-1) == y).sum(-1)


def _binary_valid(logits: torch.Tensor, y: torch.Tensor, batch: int) -> list[dict]:
    """valid/loss, acc, balanced_acc and auroc of every head from its logits ([K, N]), as
    ``metrics.Meter(full=True)`` measures them over batches of ``batch``."""
    k, n = logits.shape
    yy = y.float().expand(k, n)
    per = F.binary_cross_entropy_with_logits(logits, yy, reduction="none")
    sums = torch.zeros(k, device=logits.device)
    for start in range(0, n, batch):
        part = per[:, start : start + batch]
        sums += part.mean(-1) * part.shape[1]
    acc = (binary_predictions(logits, batch) == y.bool()).double().mean(-1)
    probs = torch.sigmoid(logits)
    positive = probs >= 0.5
    recalls = []
    for cls in (0, 1):
        support = (y == cls).sum()
        hits = ((positive == bool(cls)) & (y == cls)).sum(-1)
        recalls.append(hits.double() / support.clamp_min(1).double())
    present = torch.stack([(y == 0).any(), (y == 1).any()]).double()
    balanced = (torch.stack(recalls, -1) * present).sum(-1) / present.sum().clamp_min(1)
    if k > 1:  # torchmetrics' multilabel AUROC is the binary AUROC of each label
        auroc = multilabel_auroc(probs.T, y.long().unsqueeze(1).expand(n, k), num_labels=k, average=None)
    else:
        auroc = binary_auroc(probs[0], y.long()).reshape(1)
    loss, acc, balanced, auroc = (t.cpu().tolist() for t in (sums / n, acc, balanced, auroc))
    return [
        {"valid/loss": loss[i], "valid/acc": acc[i], "valid/balanced_acc": balanced[i], "valid/auroc": auroc[i]}
        for i in range(k)
    ]
