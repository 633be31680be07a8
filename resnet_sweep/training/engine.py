"""Training and evaluation: epochs 0..N (each a training pass and a validation pass through one
loop), the best epoch on the objective, early stopping, test metrics."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torchmetrics
from torch import nn
from tqdm.auto import tqdm

from resnet_sweep.config.objective import better, direction
from resnet_sweep.core import faults
from resnet_sweep.core.errors import Diverged
from resnet_sweep.training.hardware import autocast
from resnet_sweep.training.metrics import (
    Meter,
    class_metrics,
    confusion,
    criterion,
    group_results,
    probabilities,
    targets,
)
from resnet_sweep.training.optimizers import learning_rates, make_optimizer, make_scheduler, step_scheduler

log = logging.getLogger(__name__)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)  # one dict of metrics per epoch, from 0
    best_epoch: int = 0
    best_value: float = math.nan
    best_state: dict | None = None
    stopped_early: bool = False

    @property
    def objective(self) -> float:
        """The sweep objective: the best epoch's value of the metric that picks it."""
        return self.best_value

    def best_metrics(self) -> dict:
        return self.epochs[self.best_epoch]


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Images go channels_last (faster convolutions); bank features are plain vectors."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _check_finite(meter: Meter, epoch: int) -> None:
    """Diverged when a loss of the epoch was not finite: read once, at the epoch's end (a check per
    step would wait for every step's result)."""
    bad = meter.non_finite()
    if bad is not None:
        raise Diverged(f"loss became {bad} at epoch {epoch}")


def _one_pass(
    model, loader, *, device, precision, epoch: int, loss_fn, meter: Meter, prefix: str, desc: str, optimizer=None
) -> dict:
    """One pass over ``loader`` (the loop every epoch runs): losses and metrics summed in ``meter`` on
    the device, read once at the end; trains when an optimizer is given."""
    training = optimizer is not None
    grad = contextlib.nullcontext() if training else torch.inference_mode()
    cast = autocast(device, precision)  # decided once (it reads the CPU's flags), entered every step
    with grad:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=None):
            faults.check()
            x = _to_device(x, device)
            y = y.to(device, non_blocking=True)
            with cast:
                logits = model(x).float()
            loss = loss_fn(logits, targets(y, meter.num_classes))
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            meter.update(loss, logits, y)  # summed on the device: nothing waits for the step
    _check_finite(meter, epoch)
    return meter.compute(prefix)


def train_one_epoch(
    model,
    loader,
    *,
    device,
    precision,
    epoch: int,
    optimizer=None,
    desc: str = "",
    num_classes: int = 2,
    class_weight=None,
) -> dict:
    """``train/loss`` and ``train/acc`` of one pass over the training split, trained by ``optimizer``;
    without one (epoch 0) the untrained model measured. ``class_weight`` weighs this loss only."""
    model.train(optimizer is not None)
    loss_fn = criterion(num_classes, weight=class_weight).to(device)
    meter = Meter(device, num_classes)
    return _one_pass(
        model, loader, device=device, precision=precision, epoch=epoch, loss_fn=loss_fn, meter=meter,
        prefix="train", desc=desc, optimizer=optimizer,
    )  # fmt: skip


def validate(
    model,
    loader,
    *,
    device,
    precision,
    epoch: int,
    desc: str = "",
    num_classes: int = 2,
    groups=None,
    aggregate: str = "mean",
) -> dict:
    """``valid/*`` of one pass over the validation split: loss, accuracy, balanced accuracy and AUROC,
    and with ``groups`` (one per tile, in loader order) the slide-level ones."""
    model.train(False)
    loss_fn = criterion(num_classes).to(device)
    meter = Meter(device, num_classes, full=True, groups=groups, aggregate=aggregate)
    return _one_pass(
        model, loader, device=device, precision=precision, epoch=epoch, loss_fn=loss_fn, meter=meter,
        prefix="valid", desc=desc,
    )  # fmt: skip


@dataclass
class Fit:
    """A fit in progress: the model, its optimizer and scheduler (restored from ``resume``), the
    history so far, and what ends an epoch (``end_epoch``). ``engine.fit`` drives it one job at a
    time; ``head_group`` drives many at once."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    history: History
    objective: str
    state_fn: object
    log_epoch: object
    resume: object
    patience: int | None
    max_epochs: int
    start: int

    @property
    def done(self) -> bool:
        """A resumed fit that had already stopped early (or ran every epoch)."""
        return self.history.stopped_early or self.start > self.max_epochs

    def end_epoch(self, epoch: int, metrics: dict, lrs: dict) -> bool:
        """Record epoch ``epoch``'s metrics (``lrs``: what it trained with): scheduler, best epoch
        and state, resume state, the job's log; True when training stops here (early stop)."""
        history, objective = self.history, self.objective
        metrics.update(lrs)
        history.epochs.append(metrics)
        value = metrics[objective]
        if epoch > 0:
            step_scheduler(self.scheduler, value)
        improved = epoch == 0 or better(value, history.best_value, objective)
        if improved:
            history.best_epoch, history.best_value = epoch, value
            history.best_state = self.state_fn()
        if self.resume:  # saved before logging: a resumed job re-logs what a kill kept from MLflow
            self.resume.save(epoch, self.model, self.optimizer, self.scheduler, history)
        self.log_epoch(epoch, metrics)
        log.info(
            "epoch %d: train loss %.4f acc %.4f | valid loss %.4f acc %.4f%s",
            epoch,
            metrics["train/loss"],
            metrics["train/acc"],
            metrics["valid/loss"],
            metrics["valid/acc"],
            "  *best*" if improved else "",
        )
        if self.patience is not None and epoch - history.best_epoch >= int(self.patience):
            history.stopped_early = True
            log.info("early stop: no improvement of %s for %s epochs", objective, self.patience)
            return True
        return False


def start_fit(
    model,
    optimizer_cfg,
    *,
    trainer_cfg,
    log_epoch,
    objective: str,
    state_fn,
    device: torch.device,
    resume=None,
    scheduler_cfg=None,
) -> Fit:
    """The model on ``device`` with its optimizer and scheduler, restored from ``resume`` (a
    previous attempt: ``restore(model, optimizer, scheduler, history) -> next epoch``)."""
    direction(objective)  # a metric that cannot pick an epoch: one line, before any work
    history = History()
    model.to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(optimizer_cfg, model)
    scheduler = make_scheduler(scheduler_cfg, optimizer)
    patience = trainer_cfg.patience
    start = resume.restore(model, optimizer, scheduler, history) if resume else 0
    if start and patience is not None and start - 1 - history.best_epoch >= int(patience):
        history.stopped_early = True
    return Fit(
        model, optimizer, scheduler, history, objective, state_fn, log_epoch, resume, patience,
        int(trainer_cfg.max_epochs), start,
    )  # fmt: skip


def fit(
    model,
    splits,
    optimizer_cfg,
    trainer_cfg,
    log_epoch,
    objective: str,
    state_fn,
    device: torch.device,
    resume=None,
    scheduler_cfg=None,
    class_weight: list[float] | None = None,
) -> History:
    """Epoch 0 measures the untrained model; epochs 1..max_epochs train. The best epoch on the
    objective is kept (its trainable state via ``state_fn``); ``patience`` epochs without
    improvement stop early. Raises Diverged on a NaN/inf loss. ``resume`` (optional) restores a
    previous attempt (``restore(model, optimizer, history) -> next epoch``) and saves
    after every epoch (``save(epoch, model, optimizer, history)``)."""
    run = start_fit(
        model,
        optimizer_cfg,
        trainer_cfg=trainer_cfg,
        log_epoch=log_epoch,
        objective=objective,
        state_fn=state_fn,
        device=device,
        resume=resume,
        scheduler_cfg=scheduler_cfg,
    )
    return train_alone(run, splits, trainer_cfg=trainer_cfg, device=device, class_weight=class_weight)


def train_alone(run: Fit, splits, *, trainer_cfg, device: torch.device, class_weight=None) -> History:
    """The epochs of ``run`` from where it starts, one batch at a time on ``device``."""
    model = run.model
    if run.done:
        return run.history
    num_classes = len(getattr(splits, "classes", None) or (0, 1))
    groups = getattr(splits, "groups", None) or {}
    aggregate = getattr(splits, "group_aggregate", "mean")
    precision, max_epochs = trainer_cfg.precision, run.max_epochs
    for epoch in range(run.start, max_epochs + 1):
        faults.check()
        splits.train.set_epoch(epoch)  # the epoch's crops (view) and order
        desc = f"epoch {epoch}/{max_epochs}"
        lrs = learning_rates(run.optimizer)  # what this epoch trains with (epoch 0: the starting LR)
        metrics = train_one_epoch(
            model,
            splits.train,
            device=device,
            precision=precision,
            epoch=epoch,
            optimizer=run.optimizer if epoch > 0 else None,
            desc=desc + " train",
            num_classes=num_classes,
            class_weight=class_weight,
        )
        metrics.update(
            validate(
                model,
                splits.valid,
                device=device,
                precision=precision,
                epoch=epoch,
                desc=desc + " valid",
                num_classes=num_classes,
                groups=groups.get("valid"),
                aggregate=aggregate,
            )
        )
        if run.end_epoch(epoch, metrics, lrs):
            break
    return run.history


def evaluate(model, loader, device, precision, num_classes: int = 2, groups=None, aggregate: str = "mean") -> dict:
    """Test metrics of ``model``: loss, accuracy, AUROC, F1, balanced accuracy (macro for N >= 3
    classes), confusion matrix (rows: true, columns: predicted); with ``groups`` (one per tile, in
    loader order) also ``test/slide/*`` and the per-group rows (``group_rows``)."""
    all_probs, all_labels = [], []
    model.to(device).eval()
    loss_fn = criterion(num_classes, reduction="sum")
    metrics = torchmetrics.MetricCollection(class_metrics(num_classes)).to(device)
    matrix = confusion(num_classes).to(device)
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0
    cast = autocast(device, precision)
    with torch.inference_mode():
        for x, y in tqdm(loader, desc="test", leave=False, disable=None):
            x = _to_device(x, device)
            y = y.to(device)
            with cast:
                logits = model(x).float()
            loss_sum += loss_fn(logits, targets(y, num_classes))  # on the device: read once, below
            n += y.numel()
            all_probs.append(probabilities(logits))
            all_labels.append(y)
    probs, labels = torch.cat(all_probs), torch.cat(all_labels)
    metrics.update(probs, labels)
    matrix.update(probs, labels)
    out = {f"test/{k}": v.item() for k, v in metrics.compute().items()}
    out["test/loss"] = loss_sum.item() / max(n, 1)
    out["confusion_matrix"] = matrix.compute().cpu().tolist()
    if groups is not None:
        slide, out["group_rows"] = group_results(probs.cpu(), labels.cpu(), groups, num_classes, aggregate)
        out.update({f"test/slide/{k}": v for k, v in slide.items()})
    return out
