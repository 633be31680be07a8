"""The optimizer and the LR scheduler of a job: built from their config groups over what trains
(the head, and the backbone at its own LR), checked once over a dummy parameter, stepped per epoch."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from resnet_sweep.config.naming import optimizer_name
from resnet_sweep.core.errors import UserError, first_line


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
