"""One job, orchestration only: it reads like the study's method section. Hydra calls root
``train.py``'s ``main(cfg)``, which builds the job's context (``job_context``: what the job takes
from its surroundings, read from Hydra once) and calls ``run_job(cfg, ctx)``; nothing else in the
package imports this module."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from resnet_sweep.config.checks import log_model
from resnet_sweep.config.naming import app_config, run_name, safe_run_name
from resnet_sweep.core import faults
from resnet_sweep.core.context import JobContext, read_parent
from resnet_sweep.core.errors import Diverged, Locked, UserError, exit_with, first_line
from resnet_sweep.core.redaction import redact
from resnet_sweep.data import cores, loading, shared_tree
from resnet_sweep.sweep.preflight import check_job
from resnet_sweep.tracking import hpo
from resnet_sweep.tracking.logged import class_counts
from resnet_sweep.tracking.runs import job_run, write_folders
from resnet_sweep.tracking.store import connect, existing_run
from resnet_sweep.tracking.sweep_dir import write_job_status
from resnet_sweep.training import engine, features, hardware, head_group, metrics, models, resume

log = logging.getLogger(__name__)


def job_context(cfg) -> JobContext:
    """What the job of ``cfg`` takes from its surroundings, read once from Hydra's config for this
    job (in a group of jobs, each in its own thread, Hydra's config is that job's while it starts):
    run mode, folders, overrides and group choices, the sweep's parent run (from the sweep folder's
    file), launcher and sweeper, the sweep's shared data, the Optuna trial. Outside Hydra (a test
    calling ``run_job``): a single run."""
    trial = cfg.get("hpo_trial")
    if not HydraConfig.initialized():
        return JobContext(trial=trial)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = (Path(str(hc.runtime.cwd)) / str(hc.sweep.dir)).absolute() if multirun else None
    return JobContext(
        multirun=multirun,
        output_dir=Path(str(hc.runtime.output_dir)) if hc.runtime.get("output_dir") else None,
        sweep_dir=sweep_dir,
        overrides=tuple(str(o) for o in hc.overrides.task),
        choices={str(k): v for k, v in hc.runtime.choices.items()},
        parent_run_id=read_parent(sweep_dir),
        hydra=hc,
        share=shared_tree.sweep_share(hc),
        trial=trial,
    )


def run_job(cfg, ctx: JobContext | None = None) -> float:
    """Train one configuration in its surroundings ``ctx`` (default: a single run); return the
    sweep objective (best validation metric). Inside a multirun, a job that failed returns NaN (the
    failure is on its MLflow run; the sweep goes on), a job stopped by the infrastructure returns
    ``hpo.INTERRUPTED`` (its epochs are kept; the sweeper re-runs it), and a signal stops the whole
    sweep."""
    ctx = ctx if ctx is not None else JobContext(trial=cfg.get("hpo_trial"))
    faults.install_handlers()
    name = safe_run_name(cfg)
    try:
        faults.check()  # a stop that landed where it was swallowed (between jobs) ends the sweep here
        check_job(cfg)
        objective, status, run_id = reuse_or_train(cfg, ctx)
        write_job_status(ctx, status, name, run_id)
        return objective
    except hpo.Pruned as e:
        write_job_status(ctx, "finished", name, reason="pruned")
        log.info("%s: %s", name, e)
        return hpo.PRUNED
    except KeyboardInterrupt as e:  # SIGTERM / SIGINT (faults.Interrupted): the sweep stops too
        write_job_status(ctx, "interrupted", name, reason=str(e) or "interrupted")
        raise
    except Locked as e:
        write_job_status(ctx, "skipped", name, reason="running in another process")
        if ctx.multirun:
            log.warning("%s: %s", name, e)
            return math.nan
        exit_with(str(e))
    except Exception as e:
        e = faults.disk_full(e, write_folders(cfg, ctx)) or e  # a full disk, whatever the writer raised
        reason = redact(first_line(e))
        if faults.stop_signal():  # e.g. "DataLoader worker exited unexpectedly": a consequence of the signal
            write_job_status(ctx, "interrupted", name, reason=f"interrupted by {faults.stop_signal()}")
            raise faults.Interrupted(faults.stop_signal()) from None
        if faults.is_infrastructure(e):
            write_job_status(ctx, "interrupted", name, reason=reason)
            then = "free space there, then re-run" if faults.is_disk_full(e) else "re-run"
            message = f"{name} interrupted: {reason}; its finished epochs are saved: {then} the same command to resume"
            if ctx.multirun and (ctx.trial or not faults.in_sweep_process()):
                log.error("%s", message)  # the Optuna sweeper re-queues it; other processes' jobs cannot stop it
                return hpo.INTERRUPTED
            if ctx.multirun:  # the next job would hit the same wall: the sweep stops here, exit 75
                raise faults.stop_sweep(message) from None
            exit_with(message, code=75)  # EX_TEMPFAIL: try again later
        write_job_status(ctx, "failed", name, reason=reason)
        if isinstance(e, (UserError, Diverged)):
            reason = redact(str(e).strip() or type(e).__name__)  # a UserError may list several lines
            if isinstance(e, Diverged):
                reason = f"{name} failed: {reason}"
            if ctx.multirun:
                log.error("%s", reason)
                return math.nan
            exit_with(reason)
        if not ctx.multirun:
            raise
        log.exception("%s failed: %s", name, redact(first_line(e)))
        return math.nan


def reuse_or_train(cfg, ctx: JobContext) -> tuple[float, str, str]:
    """The result of a job that finished before (its MLflow run still there), else trained now,
    continuing an interrupted attempt's epochs. -> (objective, finished | reused, MLflow run id)."""
    if ctx.multirun:
        cores.share(ctx.hydra)
    hardware.keep_freed_memory()
    identity = job_identity(cfg, ctx.share)
    # two trials at the same point (a categorical search, sweeps sharing a study): the second waits
    # for the first and reuses its result; a grid's job held by another sweep is skipped and counted
    resumer = resume.Resumer(cfg.trainer.resume_dir, identity, enabled=bool(cfg.trainer.resume), wait=bool(ctx.trial))
    with resumer:
        state = resumer.load()
        if state and state["finished"]:
            connect(cfg.tracking)
            if existing_run(state["run_id"]) is not None:
                log.info(
                    "%s: already finished (MLflow run %s), reused; trainer.resume=false runs it again",
                    run_name(cfg),
                    state["run_id"],
                )
                return state["objective"], "reused", state["run_id"]
            log.warning(
                "%s: finished before, but its MLflow run %s is not in tracking.uri=%s: running it again",
                run_name(cfg),
                state["run_id"],
                redact(cfg.tracking.uri),
            )
            state = None
        objective, run_id = train_and_log(cfg, ctx, resumer, state)
        resumer.finished(run_id, objective)
    return objective, "finished", run_id


def job_identity(cfg, share=None) -> dict:
    """What makes two jobs the same job (the resume key): the resolved config and the data's files.
    An Optuna trial counts by its study and its point, not its number: the trial that replaces an
    interrupted one at the same point continues that one's epochs and MLflow run."""
    identity = {**app_config(cfg), "data_fingerprint": loading.data_fingerprint(cfg.data, share=share)}
    identity["trainer"].pop("batch_heads", None)  # how it trains, not what: a grouped job resumes alone
    if identity.get("hpo_trial"):
        identity["hpo_trial"] = {"study": identity["hpo_trial"].get("study")}
    return identity


def train_and_log(cfg, ctx: JobContext, resumer, state) -> tuple[float, str]:
    """Train the job (from ``state``, an interrupted attempt's, if any) inside its MLflow run;
    test the best checkpoint and log it. -> (objective, MLflow run id)."""
    with job_run(cfg, ctx, resume_run_id=state["run_id"] if state else None, on_start=resumer.started) as job:
        seed_everything(cfg.seed)
        device = hardware.resolve_device(cfg.trainer.device, hydra_cfg=ctx.hydra)
        splits = loading.job_splits(cfg, device, share=ctx.share)
        built = head_group.build_classifier(cfg.backbone, cfg.head, seed=int(cfg.seed), num_classes=len(splits.classes))
        job.tags(
            later=True,
            weights_source=built.weights_source,
            data_root=str(splits.root),
            device=str(device),
            **{"model.trainable_params": built.trainable_params, "model.total_params": built.total_params},
            **{f"class_counts.{split}": counts for split, counts in class_counts(splits).items()},
        )  # written with the feature bank's, below
        job.dataset(splits, cfg.data)
        weights = metrics.class_weights(cfg.loss.class_weight, loading.class_counts(splits)["train"], splits.classes)
        log.info(
            "%s: %s of %s parameters train (backbone.freeze=%s)",
            job.name,
            f"{built.trainable_params:,}",
            f"{built.total_params:,}",
            cfg.backbone.freeze,
        )
        job.skipped_images(splits.skipped)
        report = hpo.reporter(ctx.trial, ctx.sweeper)  # None outside an Optuna sweep

        def on_epoch(epoch: int, metrics: dict) -> None:
            job.epoch(epoch, metrics)
            if report:
                report(epoch, metrics[cfg.objective])

        model, inputs = built.model, splits
        if features.wanted(cfg):  # frozen backbone: train the head on features computed once
            bank = features.get(cfg, built, splits, device)
            job.tags(later=True, feature_bank=bank.key, feature_bank_views=bank.views)
            model = features.HeadOnly(built.model.head)
            inputs = features.splits_from(bank, splits, int(cfg.trainer.batch_size), int(cfg.seed))
        job.write()  # the tags above, before the first epoch
        member = head_group.current() if features.wanted(cfg) else None
        history = (member.fit if member else engine.fit)(
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
            class_weight=weights,
        )
        job.history(history)
        built.model.load_state_dict(history.best_state, strict=False)
        test = job.test_metrics(
            engine.evaluate(
                model,
                inputs.test,
                device,
                cfg.trainer.precision,
                len(splits.classes),
                groups=splits.groups["test"] if splits.groups else None,
                aggregate=splits.group_aggregate,
            ),
            splits.classes,
        )
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
        if should_log_model(cfg, ctx):
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


def should_log_model(cfg, ctx: JobContext) -> bool:
    """Every run (all), only the sweep's best (best: logged by the sweep callback at the end; a
    single run is its own best), or none."""
    choice = log_model(cfg.tracking)
    return choice == "all" or (choice == "best" and not ctx.multirun)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
