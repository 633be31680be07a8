"""Training and evaluation: epochs 0..N, best epoch on the objective, early stopping, test metrics."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchmetrics
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from resnet_sweep.config import checks
from resnet_sweep.config.naming import optimizer_name
from resnet_sweep.config.objective import better, direction
from resnet_sweep.core import faults
from resnet_sweep.core.errors import Diverged, UserError, first_line
from resnet_sweep.training import devices
from resnet_sweep.training.metrics import (
    Meter,
    class_metrics,
    confusion,
    criterion,
    group_results,
    probabilities,
    targets,
)

log = logging.getLogger(__name__)


def resolve_device(name: str, *, hydra_cfg=None) -> torch.device:
    """``trainer.device`` as a torch device: ``auto`` (a GPU when CUDA is available, else the CPU), ``cpu``,
    ``cuda`` (a GPU) or ``cuda:N`` (that one). ``auto`` and ``cuda`` name the GPU: ``cuda:0``, or, in a
    worker of a parallel sweep (``hydra/launcher=joblib`` or ``gpus``), the GPU of the worker's launcher
    slot (``devices.pick_gpu``: the sweep's jobs spread over the visible GPUs, at most
    ceil(n_jobs / GPUs) on one at once, each worker keeping its GPU). A GPU becomes torch's current
    device, so nothing lands on GPU 0 by default. ``hydra_cfg``: the job's ``hydra.*``
    (``JobContext.hydra``; None outside Hydra)."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = check_device(name)
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", devices.pick_gpu(gpus=torch.cuda.device_count(), hydra_cfg=hydra_cfg))
    torch.cuda.set_device(device)
    return device


def check_device(name: str) -> torch.device:
    """``trainer.device`` on this machine, nothing chosen or touched: ``cuda`` where CUDA is not
    available, or ``cuda:N`` past the GPUs visible, is one line (``preflight.check_job``, before any run)."""
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu"))
    except RuntimeError:
        raise UserError(f"trainer.device={name}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name}: CUDA is not available here; use auto or cpu")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= gpus:
        raise UserError(f"trainer.device={name}: only {gpus} GPU(s) visible here (cuda:0..cuda:{gpus - 1})")
    return device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory instead of handing it back to the kernel.

    By default glibc serves every allocation above its mmap threshold (at most 32 MB) with fresh
    pages from the kernel and unmaps them on free, and trims the heap's free top. A ResNet forward
    allocates such activations at every layer (batch 64 at 224 px: 100 MB after the first conv),
    so every batch page-faults and zero-fills them again. On the 2-core CI machine that was a third
    of the time of a bf16 ResNet18 forward: 153 img/s at batch 64 by default, 230 img/s with this
    (kernel time 19 s -> 0.7 s over the same work), and the peak resident memory grew by 0.3 GB.
    The process keeps its peak heap until it exits. ``RESNET_SWEEP_MALLOC=default`` keeps glibc's
    defaults. Returns whether the setting was applied (glibc only; elsewhere a no-op)."""
    if os.environ.get("RESNET_SWEEP_MALLOC", "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 fast (AMX or AVX512-BF16); read once a process (``/proc/cpuinfo``
    took 2-5 ms a read on a 2-core VM: a training step of a small head is less)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device``; ``auto``: where the hardware runs it fast
    (AMX/AVX512-BF16 CPUs, bf16 GPUs; an AVX2-only CPU runs a bf16 ResNet18 some 30x slower than fp32)."""
    use = checks.precision(precision)
    if use is None:  # auto
        use = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and cpu_has_bf16())
    return use


def autocast(device: torch.device, precision: str):
    """bf16 autocast where ``uses_bf16`` says so, else nothing."""
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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


def run_epoch(
    model,
    loader,
    device,
    precision,
    prefix,
    epoch,
    optimizer=None,
    desc="",
    num_classes: int = 2,
    class_weight=None,
    groups=None,
    aggregate: str = "mean",
) -> dict:
    """One pass over ``loader``; trains when an optimizer is given. Evaluation passes also measure
    balanced accuracy and AUROC. ``class_weight`` weighs the training loss only (``train/loss``)."""
    training = optimizer is not None
    model.train(training)
    loss_fn = criterion(num_classes, weight=class_weight if prefix == "train" else None).to(device)
    evaluating = not training and prefix != "train"
    meter = Meter(device, num_classes, full=evaluating, groups=groups if evaluating else None, aggregate=aggregate)
    grad = contextlib.nullcontext() if training else torch.inference_mode()
    cast = autocast(device, precision)  # decided once (it reads the CPU's flags), entered every step
    with grad:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=None):
            faults.check()
            x = _to_device(x, device)
            y = y.to(device, non_blocking=True)
            with cast:
                logits = model(x).float()
            loss = loss_fn(logits, targets(y, num_classes))
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            meter.update(loss, logits, y)  # summed on the device: nothing waits for the step
    _check_finite(meter, epoch)
    return meter.compute(prefix)


def make_optimizer(optimizer_cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over what trains: one parameter group for the head at ``optimizer.lr``,
    and, when part of the backbone trains, one for it at ``lr * optimizer.backbone_lr_scale``."""
    cfg = OmegaConf.to_container(optimizer_cfg, resolve=True)
    scale = cfg.pop("backbone_lr_scale", 1.0)
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise UserError(f"optimizer.backbone_lr_scale={scale}: must be a number > 0 (1.0: the head's LR)")
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    if not head and not backbone:
        raise UserError("backbone.freeze and head leave nothing to train")
    groups = [{"params": head, "name": "head"}] if head else []
    if backbone:
        groups.append({"params": backbone, "name": "backbone", "lr": float(cfg["lr"]) * scale})
    return instantiate(cfg)(groups)


def make_scheduler(scheduler_cfg, optimizer):
    """``scheduler`` config group: none (constant LR, the study's setting), cosine, step, plateau."""
    if not scheduler_cfg or "_target_" not in scheduler_cfg:
        return None
    return instantiate(scheduler_cfg)(optimizer)


def check_optimizer(optimizer_cfg, scheduler_cfg) -> None:
    """Build the configured optimizer (and scheduler) over one dummy parameter: a value out of range
    (``optimizer.momentum=-1``) is named here, not in a traceback mid-job."""
    probe = nn.Linear(1, 1)
    probe.head = nn.Linear(1, 1)
    try:
        optimizer = make_optimizer(optimizer_cfg, probe)
    except UserError:
        raise
    except Exception as e:  # torch names the argument ("Invalid momentum value: -1.0"): so does the error
        named = [f"optimizer.{k}={v}" for k, v in optimizer_cfg.items() if not k.startswith("_") and k in str(e)]
        where = named[0] if named else f"optimizer={optimizer_name(optimizer_cfg)}"
        raise UserError(f"{where}: {first_line(e)}; check the optimizer.* values") from None
    try:
        make_scheduler(scheduler_cfg, optimizer)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"scheduler: {first_line(e)}; check the scheduler.* values") from None


def warmup_cosine(optimizer, warmup_epochs: int, start_factor: float, min_lr_scale: float, max_epochs: int):
    """Linear warm-up over the first ``warmup_epochs`` epochs, then cosine annealing, ending just above
    ``lr * min_lr_scale`` at the last epoch (stepped once per epoch)."""
    from torch.optim import lr_scheduler

    warmup_epochs = max(0, min(int(warmup_epochs), int(max_epochs) - 1))
    floor = [g["lr"] * min_lr_scale for g in optimizer.param_groups]
    cosine = lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, int(max_epochs) - warmup_epochs), eta_min=min(floor)
    )
    if warmup_epochs == 0:
        return cosine
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=start_factor, total_iters=warmup_epochs)
    return lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def step_scheduler(scheduler, value: float) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(value)  # on the objective
    else:
        scheduler.step()


def learning_rates(optimizer) -> dict:
    """``lr/head`` (and ``lr/backbone``): the LRs the next epoch trains with."""
    return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}


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
    trainer_cfg,
    log_epoch,
    objective: str,
    *,
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
        trainer_cfg,
        log_epoch,
        objective,
        state_fn=state_fn,
        device=device,
        resume=resume,
        scheduler_cfg=scheduler_cfg,
    )
    return train_alone(run, splits, trainer_cfg, device=device, class_weight=class_weight)


def train_alone(run: Fit, splits, trainer_cfg, *, device: torch.device, class_weight=None) -> History:
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
        train = run.optimizer if epoch > 0 else None
        metrics = run_epoch(
            model, splits.train, device, precision, "train", epoch, train, desc + " train", num_classes, class_weight
        )
        metrics.update(
            run_epoch(
                model,
                splits.valid,
                device,
                precision,
                "valid",
                epoch,
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
