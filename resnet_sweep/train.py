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

from . import data, engine, faults, features, hpo, models, resume, tracking
from .errors import Diverged, Locked, UserError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def run(cfg) -> float:
    """Train one configuration; return the sweep objective (best validation metric). Inside a
    multirun, a job that failed returns NaN (the failure is on its MLflow run; the sweep goes on), a
    job stopped by the infrastructure returns ``hpo.INTERRUPTED`` (its epochs are kept; the sweeper
    re-runs it), and a signal stops the whole sweep."""
    faults.install_handlers()
    name = safe_run_name(cfg)
    try:
        faults.check()  # a stop that landed where it was swallowed (between jobs) ends the sweep here
        check_config(cfg)
        objective, status, run_id = _run(cfg)
        tracking.write_job_status(status, name, run_id)
        return objective
    except hpo.Pruned as e:
        tracking.write_job_status("finished", name, reason="pruned")
        log.info("%s: %s", name, e)
        return hpo.PRUNED
    except KeyboardInterrupt as e:  # SIGTERM / SIGINT (faults.Interrupted): the sweep stops too
        tracking.write_job_status("interrupted", name, reason=str(e) or "interrupted")
        raise
    except Locked as e:
        tracking.write_job_status("skipped", name, reason="running in another process")
        if tracking.in_multirun():
            log.warning("%s: %s", name, e)
            return math.nan
        exit_with(str(e))
    except Exception as e:
        reason = tracking.redact(tracking.failure_reason(e))
        if faults.stop_signal():  # e.g. "DataLoader worker exited unexpectedly": a consequence of the signal
            tracking.write_job_status("interrupted", name, reason=f"interrupted by {faults.stop_signal()}")
            raise faults.Interrupted(faults.stop_signal()) from None
        if faults.is_infrastructure(e):
            tracking.write_job_status("interrupted", name, reason=reason)
            message = f"{name} interrupted: {reason}; its finished epochs are saved: re-run the same command to resume"
            if tracking.in_multirun():
                log.error("%s", message)
                return hpo.INTERRUPTED
            exit_with(message, code=75)  # EX_TEMPFAIL: try again later
        tracking.write_job_status("failed", name, reason=reason)
        if isinstance(e, (UserError, Diverged)):
            reason = tracking.redact(str(e).strip() or type(e).__name__)  # a UserError may list several lines
            if isinstance(e, Diverged):
                reason = f"{name} failed: {reason}"
            if tracking.in_multirun():
                log.error("%s", reason)
                return math.nan
            exit_with(reason)
        if not tracking.in_multirun():
            raise
        log.exception("%s failed: %s", name, tracking.redact(tracking.failure_reason(e)))
        return math.nan


def safe_run_name(cfg) -> str:
    try:
        return tracking.run_name(cfg)
    except Exception:  # a config error (optimizer.lr=abc): check_config says which
        return str(cfg.get("run_name") or "job")


def exit_with(message: str, code: int = 1):
    """One line on stderr and a non-zero exit; the full traceback with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise UserError(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _run(cfg) -> tuple[float, str, str]:
    """-> (objective, finished | reused, MLflow run id)."""
    share_cores()
    engine.keep_freed_memory()
    identity = job_identity(cfg)
    # two trials at the same point (a categorical search, sweeps sharing a study): the second waits
    # for the first and reuses its result; a grid's job held by another sweep is skipped and counted
    resumer = resume.Resumer(
        cfg.trainer.resume_dir, identity, enabled=bool(cfg.trainer.resume), wait=bool(cfg.get("hpo_trial"))
    )
    with resumer:
        state = resumer.load()
        if state and state["finished"]:
            tracking.connect(cfg.tracking)
            if tracking.existing_run(state["run_id"]) is not None:
                log.info(
                    "%s: already finished (MLflow run %s), reused; trainer.resume=false runs it again",
                    tracking.run_name(cfg),
                    state["run_id"],
                )
                return state["objective"], "reused", state["run_id"]
            log.warning(
                "%s: finished before, but its MLflow run %s is not in tracking.uri=%s: running it again",
                tracking.run_name(cfg),
                state["run_id"],
                tracking.redact(cfg.tracking.uri),
            )
            state = None
        objective, run_id = _train(cfg, resumer, state)
        resumer.finished(run_id, objective)
    return objective, "finished", run_id


def job_identity(cfg) -> dict:
    """What makes two jobs the same job (the resume key): the resolved config and the data's files.
    An Optuna trial counts by its study and its point, not its number: the trial that replaces an
    interrupted one at the same point continues that one's epochs and MLflow run."""
    identity = {**tracking.app_config(cfg), "data_fingerprint": data.data_fingerprint(cfg.data)}
    if identity.get("hpo_trial"):
        identity["hpo_trial"] = {"study": identity["hpo_trial"].get("study")}
    return identity


def _train(cfg, resumer, state) -> tuple[float, str]:
    with tracking.job_run(cfg, resume_run_id=state["run_id"] if state else None, on_start=resumer.started) as job:
        seed_everything(cfg.seed)
        device = engine.resolve_device(cfg.trainer.device)
        splits = data.build(
            cfg.data,
            cfg.trainer,
            crop_size=int(cfg.backbone.crop_size),
            seed=int(cfg.seed),
            resize=cfg.backbone.get("resize"),
            crop_seed=cfg.trainer.crop_seed,
            device=device,
        )
        built = models.build(cfg.backbone, cfg.head, seed=int(cfg.seed))
        job.tags(weights_source=built.weights_source, data_root=str(splits.root), device=str(device))
        job.params({"model.trainable_params": built.trainable_params, "model.total_params": built.total_params})
        log.info(
            "%s: %s of %s parameters train (backbone.freeze=%s)",
            job.name,
            f"{built.trainable_params:,}",
            f"{built.total_params:,}",
            cfg.backbone.freeze,
        )
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
        history = engine.fit(
            model,
            inputs,
            cfg.optimizer,
            cfg.trainer,
            on_epoch,
            cfg.objective,
            state_fn=lambda: models.trainable_state(built.model),
            device=device,
            resume=resume.EpochHooks(resumer, state, job),
            scheduler_cfg=cfg.get("scheduler"),
        )
        job.history(history)
        built.model.load_state_dict(history.best_state, strict=False)
        test = job.test_metrics(engine.evaluate(model, inputs.test, device, cfg.trainer.precision), splits.classes)
        ckpt = models.checkpoint(
            built,
            history.best_state,
            cfg,
            {
                "epoch": history.best_epoch,
                "classes": splits.classes,
                "mean": list(splits.mean),
                "std": list(splits.std),
                "crop_size": splits.crop_size,
                "resize": splits.resize,
            },
        )
        if cfg.tracking.log_checkpoint:
            job.checkpoint(ckpt)
        if should_log_model(cfg):
            job.model(built.model, ckpt)
    log.info(
        "%s: best epoch %d, %s = %.4f; test loss %.4f, test acc %.2f%% (MLflow run %s)",
        job.name,
        history.best_epoch,
        cfg.objective,
        history.objective,
        test["test/loss"],
        100 * test["test/acc"],
        job.run_id,
    )
    return history.objective, job.run_id


def should_log_model(cfg) -> bool:
    """Every run (all), only the sweep's best (best: logged by the sweep callback at the end; a
    single run is its own best), or none."""
    choice = str(cfg.tracking.log_model)
    if choice not in ("all", "best", "none"):
        raise UserError(f"tracking.log_model={choice}: choose all, best or none")
    return choice == "all" or (choice == "best" and not tracking.in_multirun())


def check_config(cfg) -> None:
    """Every config value that would otherwise fail late, with a traceback, or silently: one line
    naming the key. Cheap (no data is read, nothing is created): run before anything else, for
    every point of a sweep (``tracking._preflight``) and again by each job."""
    lr = cfg.optimizer.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"optimizer.lr={lr}: the learning rate must be a number > 0")
    for key in ("max_epochs", "batch_size", "num_workers", "bank_views"):
        value = cfg.trainer.get(key)
        low = 0 if key == "num_workers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"trainer.{key}={value}: must be an integer >= {low}")
    patience = cfg.trainer.patience
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise UserError(f"trainer.patience={patience}: must be an integer >= 1, or null to never stop early")
    bank_batch = cfg.trainer.get("bank_batch_size")
    if bank_batch is not None and (isinstance(bank_batch, bool) or not isinstance(bank_batch, int) or bank_batch < 1):
        raise UserError(
            f"trainer.bank_batch_size={bank_batch}: must be an integer >= 1, or null for "
            f"{features.EXTRACT_BATCH['cpu']} on a CPU, {features.EXTRACT_BATCH['cuda']} on a GPU"
        )
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UserError(f"seed={cfg.seed}: must be an integer")
    engine.direction(str(cfg.objective))
    engine.autocast(torch.device("cpu"), cfg.trainer.precision)  # checks the choice
    features.wanted(cfg)  # checks trainer.feature_bank
    should_log_model(cfg)
    check_optimizer(cfg)
    check_data(cfg.data)


def check_optimizer(cfg) -> None:
    """Build the configured optimizer (and scheduler) over one dummy parameter: a value of the wrong
    type (``optimizer.momentum=abc``) or out of range is named here, not in a traceback mid-job."""
    probe = torch.nn.Linear(1, 1)
    probe.head = torch.nn.Linear(1, 1)
    try:
        optimizer = engine.make_optimizer(cfg.optimizer, probe)
    except UserError:
        raise
    except Exception as e:
        wrong = [f"optimizer.{k}={v}" for k, v in cfg.optimizer.items() if isinstance(v, str) and not k.startswith("_")]
        where = wrong[0] if wrong else f"optimizer={tracking.optimizer_name(cfg.optimizer)}"
        raise UserError(f"{where}: {tracking.failure_reason(e)}; check the optimizer.* values") from None
    try:
        engine.make_scheduler(cfg.get("scheduler"), optimizer)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"scheduler: {tracking.failure_reason(e)}; check the scheduler.* values") from None


def check_data(data_cfg) -> None:
    """The data keys, without reading the data: a user's root must exist; the demo takes no root."""
    data.check_root(data_cfg)
    if str(data_cfg.get("on_bad_image", "error")) not in ("error", "skip"):
        raise UserError(f"data.on_bad_image={data_cfg.on_bad_image}: choose error or skip")
    if str(data_cfg.get("normalize")) not in ("imagenet", "dataset"):
        raise UserError(f"data.normalize={data_cfg.get('normalize')}: choose imagenet or dataset")
    data.check_augment(data_cfg.get("augment"))


def share_cores() -> None:
    """Jobs that run side by side share this machine's cores (see ``threads_per_job``)."""
    if not tracking.in_multirun():
        return
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    threads = threads_per_job(hc.launcher, hc.sweeper, available_cores())
    if threads:
        torch.set_num_threads(threads)
        log.info(
            "%d torch thread(s) for this job (hydra.launcher: %s)",
            threads,
            str(hc.launcher.get("_target_", "?")).rsplit(".", 1)[-1],
        )


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
