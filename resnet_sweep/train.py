"""One job, orchestration only: it reads like the study's method section."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from . import data, engine, features, hpo, models, resume, tracking
from .errors import Diverged, UserError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def run(cfg) -> float:
    """Train one configuration; return the sweep objective (best validation metric), or NaN when
    the job failed inside a multirun (the failure is on its MLflow run; the sweep goes on)."""
    try:
        return _run(cfg)
    except hpo.Pruned as e:
        log.info("%s: %s", tracking.run_name(cfg), e)
        return hpo.PRUNED
    except (UserError, Diverged) as e:
        reason = tracking.redact(str(e).strip() or type(e).__name__)  # a UserError may list several lines
        if isinstance(e, Diverged):
            reason = f"{tracking.run_name(cfg)} failed: {reason}"
        if tracking.in_multirun():
            log.error("%s", reason)
            return math.nan
        exit_with(reason)
    except Exception as e:
        if not tracking.in_multirun():
            raise
        log.exception("%s failed: %s", tracking.run_name(cfg), tracking.redact(tracking.failure_reason(e)))
        return math.nan


def exit_with(message: str, code: int = 1):
    """One line on stderr and a non-zero exit; the full traceback with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise UserError(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _run(cfg) -> float:
    share_cores()
    engine.keep_freed_memory()
    resumer = resume.Resumer(cfg.trainer.resume_dir, tracking.app_config(cfg), enabled=bool(cfg.trainer.resume))
    with resumer:
        state = resumer.load()
        if state and state["finished"]:
            tracking.adopt_run(state["run_id"])
            log.info("%s: already finished (MLflow run %s), skipped; trainer.resume=false runs it again",
                     tracking.run_name(cfg), state["run_id"])
            return state["objective"]
        try:
            objective, run_id = _train(cfg, resumer, state)
        except Exception:  # Diverged and Pruned included
            resumer.forget()  # a failed job starts afresh next time
            raise
        resumer.finished(run_id, objective)
    return objective


def _train(cfg, resumer, state) -> tuple[float, str]:
    with tracking.job_run(cfg, resume_run_id=state["run_id"] if state else None) as job:
        resumer.started(job.run_id)
        validate(cfg)
        seed_everything(cfg.seed)
        device = engine.resolve_device(cfg.trainer.device)
        splits = data.build(cfg.data, cfg.trainer, crop_size=int(cfg.backbone.crop_size), seed=int(cfg.seed),
                            resize=cfg.backbone.get("resize"), crop_seed=cfg.trainer.crop_seed)
        built = models.build(cfg.backbone, cfg.head, seed=int(cfg.seed))
        job.tags(weights_source=built.weights_source, data_root=str(splits.root), device=str(device))
        job.params({"model.trainable_params": built.trainable_params, "model.total_params": built.total_params})
        log.info("%s: %s of %s parameters train (backbone.freeze=%s)", job.name, f"{built.trainable_params:,}",
                 f"{built.total_params:,}", cfg.backbone.freeze)
        job.skipped_images(splits.skipped)
        report = hpo.reporter(cfg)  # None outside an Optuna sweep

        def on_epoch(epoch: int, metrics: dict) -> None:
            job.epoch(epoch, metrics)
            if report:
                report(epoch, metrics[cfg.objective])

        model, inputs = built.model, splits
        if features.wanted(cfg):  # frozen backbone: train the head on features computed once
            bank = features.get(cfg, built, splits, device)
            job.tags(feature_bank=bank.key, feature_bank_views=bank.views)
            model = features.HeadOnly(built.model.head)
            inputs = features.splits_from(bank, splits, int(cfg.trainer.batch_size), int(cfg.seed))
        history = engine.fit(model, inputs, cfg.optimizer, cfg.trainer, on_epoch, cfg.objective,
                             state_fn=lambda: models.trainable_state(built.model), device=device,
                             resume=resume.EpochHooks(resumer, state, job), scheduler_cfg=cfg.get("scheduler"))
        job.history(history)
        built.model.load_state_dict(history.best_state, strict=False)
        job.test_metrics(engine.evaluate(model, inputs.test, device, cfg.trainer.precision), splits.classes)
        ckpt = models.checkpoint(built, history.best_state, cfg, {
            "epoch": history.best_epoch, "classes": splits.classes, "mean": list(splits.mean),
            "std": list(splits.std), "crop_size": splits.crop_size, "resize": splits.resize,
        })
        if cfg.tracking.log_checkpoint:
            job.checkpoint(ckpt)
        if should_log_model(cfg):
            job.model(built.model, ckpt)
    log.info("%s: best epoch %d, %s = %.4f", job.name, history.best_epoch, cfg.objective, history.objective)
    return history.objective, job.run_id


def should_log_model(cfg) -> bool:
    """Every run (all), only the sweep's best (best: logged by the sweep callback at the end; a
    single run is its own best), or none."""
    choice = str(cfg.tracking.log_model)
    if choice not in ("all", "best", "none"):
        raise UserError(f"tracking.log_model={choice}: choose all, best or none")
    return choice == "all" or (choice == "best" and not tracking.in_multirun())


def validate(cfg) -> None:
    """Config values that would otherwise fail late or silently."""
    lr = cfg.optimizer.lr
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"optimizer.lr={lr}: the learning rate must be a number > 0")
    if not isinstance(cfg.trainer.max_epochs, int) or cfg.trainer.max_epochs < 1:
        raise UserError(f"trainer.max_epochs={cfg.trainer.max_epochs}: must be an integer >= 1")
    patience = cfg.trainer.patience
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise UserError(f"trainer.patience={patience}: must be an integer >= 1, or null to never stop early")
    if not isinstance(cfg.trainer.batch_size, int) or cfg.trainer.batch_size < 1:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size}: must be an integer >= 1")
    views, bank_batch = cfg.trainer.bank_views, cfg.trainer.get("bank_batch_size")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise UserError(f"trainer.bank_views={views}: must be an integer >= 1 (random crops per training image)")
    if bank_batch is not None and (isinstance(bank_batch, bool) or not isinstance(bank_batch, int) or bank_batch < 1):
        raise UserError(f"trainer.bank_batch_size={bank_batch}: must be an integer >= 1, or null for "
                        f"{features.EXTRACT_BATCH}")
    engine.direction(str(cfg.objective))
    should_log_model(cfg)


def share_cores() -> None:
    """Jobs that run side by side share this machine's cores (see ``threads_per_job``)."""
    if not tracking.in_multirun():
        return
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    threads = threads_per_job(hc.launcher, hc.sweeper, available_cores())
    if threads:
        torch.set_num_threads(threads)
        log.info("%d torch thread(s) for this job (hydra.launcher: %s)", threads,
                 str(hc.launcher.get("_target_", "?")).rsplit(".", 1)[-1])


def available_cores() -> int:
    """Cores this process may run on (a SLURM allocation or taskset included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(launcher, sweeper, cores: int) -> int | None:
    """Torch threads for one job, or None to keep torch's default (the job is alone).

    - ``cpus_per_task`` set (submitit: SLURM or local): exactly that many; under SLURM without
      it, the cores of the allocation;
    - joblib: cores / jobs at once, where jobs at once = ``n_jobs`` (-1 = all cores, -2 = all
      but one, as in joblib), capped by the Optuna sweeper's batch (``hydra.sweeper.n_jobs``);
    - submitit_local without ``cpus_per_task``: every job of a batch starts at once, so
      cores / the Optuna sweeper's batch (a grid's size is unknown here: set cpus_per_task).
    """
    target = str(launcher.get("_target_", ""))
    cpus = launcher.get("cpus_per_task")
    if isinstance(cpus, int) and cpus >= 1:
        return cpus
    if target.endswith("SlurmLauncher"):
        return cores
    optuna = str(sweeper.get("_target_", "")).startswith("hydra_plugins.resnet_sweep_optuna")
    batch = sweeper.get("n_jobs") if optuna else None
    batch = batch if isinstance(batch, int) and batch >= 1 else None
    n_jobs = launcher.get("n_jobs")
    if isinstance(n_jobs, int) and n_jobs != 0:  # joblib
        at_once = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
        at_once = min(at_once, batch) if batch else at_once
    elif "submitit" in target:
        at_once = batch or 1
    else:
        return None
    return max(1, cores // at_once) if at_once > 1 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def check_group_choices(argv: list[str] | None = None) -> None:
    """Unknown config-group choices (``backbone=resnet99``) as one line listing the choices,
    before Hydra composes anything."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:
        return  # Hydra reports syntax errors itself
    for o in overrides:
        group = o.key_or_group.lstrip("+~")
        if o.package or o.is_delete() or not (CONF_DIR / group).is_dir():
            continue
        if group.startswith("hydra/"):  # plugins add options (hydra/launcher=joblib): Hydra checks these
            continue
        if o.value_type == ValueType.ELEMENT:
            values = [o.value()]
        elif o.value_type in (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP):
            values = list(o.value().list)
        else:
            continue
        options = group_options(group)
        unknown = [str(v) for v in values if v is not None and str(v) not in options]
        if unknown:
            print(
                f"{group}={unknown[0]}: unknown {group}; choose one of {', '.join(options)}",
                file=sys.stderr,
            )
            sys.exit(2)
