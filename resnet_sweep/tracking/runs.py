"""One MLflow run per job (a child of the sweep's parent run in ``-m`` mode): opened with its params
and tags, marked FAILED or KILLED with the reason on the way out (``job_run``); what the job logs to
it is ``job_log.JobLog``. The sweep's parent run, for its jobs (``set_parent``)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from resnet_sweep.config.naming import app_config, experiment_params, optimizer_name, run_name, what_trains
from resnet_sweep.core import faults, sealed
from resnet_sweep.core.context import PARENT_FILE, JobContext
from resnet_sweep.core.errors import first_line
from resnet_sweep.core.redaction import redact
from resnet_sweep.tracking.hpo import Pruned
from resnet_sweep.tracking.job_log import JobLog, local_artifacts
from resnet_sweep.tracking.store import connect, existing_run

log = logging.getLogger(__name__)

FAILURE_TAG = "failure_reason"
PROJECT_DIR = Path(__file__).resolve().parents[2]


def _git_commit() -> str | None:
    """The commit of the resnet-sweep code that ran (not of the folder the user runs from)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _scheduler_name(cfg, choices) -> str:
    """The scheduler config chosen (``cosine``, ``step``, ``plateau``, ``none``)."""
    if "scheduler" in choices:
        return str(choices["scheduler"])
    target = (cfg.get("scheduler") or {}).get("_target_")
    return str(target).rsplit(".", 1)[-1] if target else "none"


def adopt_run(run, parent: str | None) -> None:
    """In a sweep (its ``parent`` run), make the run of an unfinished earlier attempt of this job
    (which this sweep now continues) a child of this sweep's parent run; the old parent is kept in a tag."""
    if parent and run.data.tags.get("mlflow.parentRunId") != parent:
        client = MlflowClient()
        if "mlflow.parentRunId" in run.data.tags:
            client.set_tag(run.info.run_id, "previous_parent_run_id", run.data.tags["mlflow.parentRunId"])
        client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)


@contextlib.contextmanager
def job_run(cfg, ctx: JobContext, resume_run_id: str | None = None, on_start=None):
    """One MLflow run for this job, a child of the sweep's parent run in ``-m`` mode (``ctx``); with
    ``resume_run_id``, the run of an earlier attempt, continued (its failure tag cleared);
    ``on_start(run_id)`` is called as soon as the run exists. A failure
    inside marks the run FAILED with the reason as a tag; an interruption (signal, store or disk
    fault, see ``faults``) marks it KILLED with the reason; then the exception propagates."""
    connect(cfg.tracking)
    parent = ctx.parent_run_id if ctx.multirun else None
    previous = existing_run(resume_run_id)
    if previous is None:
        resume_run_id = None
    else:
        adopt_run(previous, parent)
    name = run_name(cfg)
    tags = {
        "backbone": cfg.backbone.name,
        "head": cfg.head.name,
        "optimizer": optimizer_name(cfg.optimizer),
        "scheduler": _scheduler_name(cfg, ctx.choices),
        "trains": what_trains(cfg.backbone).description,
        "objective": cfg.objective,
        "hydra_overrides": redact(" ".join(ctx.overrides)),
    }
    if ctx.output_dir is not None:
        tags["output_dir"] = str(ctx.output_dir)
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    trial = cfg.get("hpo_trial")
    if trial:
        tags.update(optuna_trial=str(trial.number), optuna_study=str(trial.study))
    start = dict(run_id=resume_run_id) if resume_run_id else dict(run_name=name, parent_run_id=parent, tags=tags)
    with mlflow.start_run(**start) as run:
        job = JobLog(cfg, run.info.run_id)
        remembered = not (on_start and resume_run_id is None)  # a new run, once its id is in the resume state
        try:
            if on_start:  # first of all (the resume state): a kill from here on continues this run
                on_start(run.info.run_id)
            remembered = True
            if previous is not None and FAILURE_TAG in previous.data.tags:
                job._call("delete_tag", mlflow.delete_tag, FAILURE_TAG)
            if previous is not None and trial:  # an interrupted trial's point, continued by its replacement
                job.tags(optuna_trial=str(trial.number), optuna_state="RUNNING")
            config = app_config(cfg)
            job.params(with_log10_lr(experiment_params(config)))
            job._call("log_text", mlflow.log_text, redact(yaml.safe_dump(config, sort_keys=False)), "config.yaml")
            yield job
            job.log_figures()
            if trial:
                job.tags(later=True, optuna_state="COMPLETE")
            job.write()
        except Pruned as e:
            job.tags(later=True, optuna_state="PRUNED", pruned_at_epoch=str(e.epoch))
            job.write()
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
        except BaseException as e:
            stopped = faults.stop_signal()  # whatever this raised, a signal is stopping the process
            full = faults.disk_full(e, write_folders(cfg, ctx))  # whatever the writer raised
            interrupted = isinstance(e, KeyboardInterrupt) or stopped is not None or faults.is_infrastructure(full or e)
            reason = f"interrupted by {stopped}" if stopped else redact(first_line(full or e))
            if not faults.is_infrastructure(full or e):  # the epochs that ended, once (not retried)
                with contextlib.suppress(Exception), faults.quiet(*faults.STORE_LOGGERS):
                    job.retry_s = 0.0
                    job.write()
            with contextlib.suppress(Exception), faults.quiet(*faults.STORE_LOGGERS):  # the store may be the fault
                tags = {FAILURE_TAG: f"interrupted: {reason}" if interrupted else reason}
                if trial:
                    tags["optuna_state"] = "INTERRUPTED" if interrupted else "FAIL"
                mlflow.set_tags(tags)
            with contextlib.suppress(Exception), faults.quiet(*faults.STORE_LOGGERS):
                mlflow.end_run(RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED))
                if not remembered:  # nothing in it, and no re-run would find it to continue: not left behind
                    MlflowClient().delete_run(run.info.run_id)
            if full is not None and full is not e:
                raise full from e
            raise


def write_folders(cfg, ctx: JobContext) -> dict[str, int]:
    """Where a job writes (folder -> 0: bytes unknown), for ``faults.disk_full``: the run's artifacts
    and the SQLite store first, then the resume state, the caches, the temp folder, Hydra's output."""
    folders = [artifacts] if (artifacts := local_artifacts()) else []
    uri = str(cfg.tracking.uri)
    if uri.startswith("sqlite:///"):
        folders.append(str(Path(os.path.expanduser(uri[len("sqlite:///") :])).parent))
    folders += [str(cfg.trainer.resume_dir), str(cfg.data.cache_dir), tempfile.gettempdir()]
    if ctx.output_dir is not None:
        folders.append(str(ctx.output_dir))
    return dict.fromkeys(folders, 0)


def with_log10_lr(params: dict[str, str]) -> dict[str, str]:
    """``optimizer.lr`` also as ``optimizer.lr_log10`` (``-3``): MLflow's charts have linear axes only."""
    with contextlib.suppress(KeyError, ValueError):
        lr = float(params["optimizer.lr"])
        if lr > 0:
            return {**params, "optimizer.lr_log10": f"{math.log10(lr):.4g}"}
    return params


def set_parent(config, parent_id: str) -> None:
    """The sweep's parent run, in a file of the sweep folder: for its jobs (``JobContext.parent_run_id``,
    in this process or another, on this machine or a SLURM node) and for people."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    sealed.write_text(sweep_dir / PARENT_FILE, parent_id + "\n")
