"""Everything MLflow: one run per job, one parent run per sweep, the sweep's best model.

Metric names (DESIGN.md decision 5): ``train/loss train/acc valid/loss valid/acc`` with
``step=epoch`` from epoch 0; ``best_epoch``; ``test/loss test/acc test/auroc test/f1
test/balanced_acc``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from . import faults, plots
from .engine import direction
from .errors import UserError
from .hpo import Pruned

log = logging.getLogger(__name__)

PARENT_ENV = "RESNET_SWEEP_PARENT_RUN_ID"
FAILURE_TAG = "failure_reason"
_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.\-]*\\?://[^:/@\s\\]*\\?:)(?P<pw>[^@/\s]+)@")


def redact(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['pre']}***@", str(text))


def _redacting_record_factory(factory):
    """Every log record (Hydra's "#0 : overrides" lines included) goes out with passwords masked."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        if isinstance(record.msg, str) and "@" in record.msg:
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(a) if isinstance(a, str) and "@" in a else a for a in record.args)
        return record

    make.redacting = True
    return make


if not getattr(logging.getLogRecordFactory(), "redacting", False):
    logging.setLogRecordFactory(_redacting_record_factory(logging.getLogRecordFactory()))


def redact_files(folder: Path) -> None:
    """Hydra saves the composed config and the overrides as typed (.hydra/*.yaml, multirun.yaml):
    mask passwords there too."""
    for path in list(folder.glob("*.yaml")) + list(folder.glob(".hydra/*.yaml")):
        with contextlib.suppress(OSError):
            text = path.read_text()
            masked = redact(text)
            if masked != text:
                path.write_text(masked)


def check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"{what}={folder}: not writable ({e.strerror or e}); choose a folder you can write to"
        ) from None


def flatten(d, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"optimizer.lr": "0.0001", ...}`` (credentials redacted)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = redact(value)
    return out


def app_config(cfg) -> dict:
    """The resolved config without Hydra's own node."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def lr_label(lr: float) -> str:
    short = f"{lr:.0e}"
    return short if float(short) == lr else f"{lr:.3g}"


def optimizer_name(optimizer_cfg) -> str:
    return str(optimizer_cfg._target_).rsplit(".", 1)[-1].lower()


def run_name(cfg) -> str:
    if cfg.run_name and cfg.run_name != "auto":
        return str(cfg.run_name)
    return (
        f"{cfg.backbone.name}-{cfg.head.name}-{optimizer_name(cfg.optimizer)}"
        f"-lr{lr_label(float(cfg.optimizer.lr))}{what_trains(cfg.backbone)[0]}-s{cfg.seed}"
    )


def what_trains(backbone_cfg) -> tuple[str, str]:
    """What ``backbone.freeze`` leaves trainable: (run-name suffix, description for the ``trains`` tag).
    ('', 'head') for the linear probe; ('-ft', 'all'); ('-last2', 'head + last 2 layers');
    ('-layer3+layer4', 'head + layer3, layer4')."""
    freeze = str(backbone_cfg.get("freeze", "all"))
    if freeze == "none":
        return "-ft", "all"
    if freeze == "last_n":
        n = backbone_cfg.get("unfreeze")
        return f"-last{n}", f"head + last {n} layers"
    if freeze == "stages":
        stages = [str(s) for s in (backbone_cfg.get("stages") or [])]
        return "-" + "+".join(stages), "head + " + ", ".join(stages)
    return "", "head"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class StoreUnreachable(UserError):
    """The MLflow store did not answer: an infrastructure fault, not a mistake in the job."""


def connect(tracking_cfg) -> str:
    """Point MLflow at the store and experiment; fail in one line if unreachable. Returns the
    experiment id."""
    mlflow.set_tracking_uri(str(tracking_cfg.uri))
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update({k: v for k, v in quick.items() if saved[k] is None})
    try:
        _probe_database(str(tracking_cfg.uri))
        with _creation_lock(str(tracking_cfg.uri)):
            experiment = _set_experiment(str(tracking_cfg.experiment))
    except Exception as e:
        reason = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise StoreUnreachable(
            f"tracking.uri={redact(tracking_cfg.uri)}: cannot reach the MLflow store ({reason}); "
            "check the URI or start the server"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    return experiment.experiment_id


def _creation_lock(uri: str):
    """A SQLite store is created (tables, migrations) by the first process that opens it: two sweeps
    started at once in a new folder raced there ("Online migration expected to match one row").
    A file lock beside the database file makes the creation one process's job."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    path = Path(os.path.expanduser(uri[len("sqlite:///") :]))
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=300)


def _probe_database(uri: str) -> None:
    """A database URI (postgresql://, mysql://...) is tried once, quickly: MLflow itself retries an
    unreachable database for about 100 s before giving up."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in ("postgresql", "mysql", "mssql"):
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    connect_args = {"connect_timeout": 10} if scheme in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _set_experiment(name: str):
    """``mlflow.set_experiment``; when parallel jobs or sweeps create the experiment at the same
    moment, the losers of the race use the winner's."""
    try:
        return mlflow.set_experiment(name)
    except Exception as e:
        if "already exist" not in str(e).lower() and "unique" not in str(e).lower():
            raise
        return mlflow.set_experiment(name)


PROJECT_DIR = Path(__file__).resolve().parent.parent


def _git_commit() -> str | None:
    """The commit of the resnet-sweep code that ran (not of the folder the user runs from)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _hydra_overrides() -> str:
    if not HydraConfig.initialized():
        return ""
    return " ".join(HydraConfig.get().overrides.task)


class JobLog:
    """What a job writes to its MLflow run. Every call is retried for ``tracking.retry_s`` seconds
    when the store does not answer (a restarting server or database), then raises."""

    def __init__(self, cfg, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.name = run_name(cfg)
        self.retry_s = float(cfg.tracking.get("retry_s", 300))

    def _call(self, what: str, fn, *args, **kwargs):
        return faults.retrying(lambda: fn(*args, **kwargs), self.retry_s, f"MLflow {what} ({self.name})")

    def tags(self, **tags) -> None:
        self._call("set_tags", mlflow.set_tags, {k: redact(v) for k, v in tags.items()})

    def params(self, params: dict) -> None:
        self._call("log_params", mlflow.log_params, params)

    def epoch(self, epoch: int, metrics: dict) -> None:
        self._call("log_metrics", mlflow.log_metrics, metrics, step=epoch)

    def skipped_images(self, skipped: list) -> None:
        """data.on_bad_image=skip: how many files were left out, and which."""
        self._call("log_metric", mlflow.log_metric, "data/skipped_images", len(skipped))
        if skipped:
            self._call(
                "log_dict",
                mlflow.log_dict,
                {"skipped": [{"path": p, "reason": r} for p, r in skipped]},
                "skipped_images.json",
            )

    def ensure_logged(self, epochs: list[dict]) -> None:
        """After a resume: log the epochs the interrupted attempt saved but did not log."""
        logged = {
            m.step
            for m in self._call("get_metric_history", MlflowClient().get_metric_history, self.run_id, "valid/loss")
        }
        for epoch, metrics in enumerate(epochs):
            if epoch not in logged:
                self.epoch(epoch, metrics)

    def history(self, history) -> None:
        best = history.best_metrics()
        self._call(
            "log_metrics",
            mlflow.log_metrics,
            {
                "best_epoch": history.best_epoch,
                "epochs_run": len(history.epochs) - 1,
                **{f"best/{k}": v for k, v in best.items()},
            },
        )
        never = history.best_epoch == 0 and len(history.epochs) > 1
        self.tags(stopped_early=str(history.stopped_early).lower(), never_improved=str(never).lower())
        if never:
            log.warning(
                "%s never improved on its untrained epoch 0 (%s); its test figures are the untrained "
                "head's: flagged never_improved=true, left out of the sweep's best run",
                self.name,
                history.objective_name,
            )
        fig = plots.learning_curves(history.epochs, history.best_epoch, self.name)
        self._call("log_figure", mlflow.log_figure, fig, "plots/learning_curves.png")
        plots.close(fig)

    def test_metrics(self, metrics: dict, classes: list[str]) -> dict:
        metrics = dict(metrics)
        matrix = metrics.pop("confusion_matrix")
        self._call("log_metrics", mlflow.log_metrics, metrics)
        self._call(
            "log_dict",
            mlflow.log_dict,
            {"classes": classes, "matrix (rows: true, cols: predicted)": matrix},
            "confusion_matrix.json",
        )
        fig = plots.confusion_matrix(matrix, classes, f"{self.name}: test")
        self._call("log_figure", mlflow.log_figure, fig, "plots/confusion_matrix.png")
        plots.close(fig)
        return metrics

    def checkpoint(self, ckpt: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "best.pt"
            torch.save(ckpt, path)
            self._call("log_artifact", mlflow.log_artifact, str(path), "checkpoint")

    def model(self, classifier, ckpt: dict) -> None:
        self._call("log_model", log_model, classifier, ckpt)


def log_model(classifier, ckpt: dict) -> None:
    """Log the full model (backbone + head) with the pytorch flavor into the active run; its pyfunc
    takes normalised ``N x 3 x crop x crop`` float32 images and returns P(ckpt['classes'][1])."""
    from mlflow.models import infer_signature

    from .models import ProbabilityModel

    model = ProbabilityModel(classifier).cpu().eval()
    crop = int(ckpt["crop_size"])
    example = np.zeros((1, 3, crop, crop), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        metadata={k: ckpt[k] for k in ("classes", "mean", "std", "crop_size")},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision"],
        serialization_format="pickle",  # torch.export would fix the batch size to the example's
        code_paths=[str(Path(__file__).resolve().parent)],  # unpickling needs resnet_sweep.models
    )


def existing_run(run_id: str | None):
    """The run, or None where this store does not have it (another store, deleted). A store that does
    not answer raises: a blip must not start a second run of the same job."""
    if not run_id:
        return None
    try:
        return MlflowClient().get_run(run_id)
    except Exception as e:
        if faults.is_infrastructure(e):
            raise
        return None


def adopt_run(run) -> None:
    """In a sweep, make the run of an unfinished earlier attempt of this job (which this sweep now
    continues) a child of this sweep's parent run; the old parent is kept in a tag."""
    parent = os.environ.get(PARENT_ENV) if in_multirun() else None
    if parent and run.data.tags.get("mlflow.parentRunId") != parent:
        client = MlflowClient()
        if "mlflow.parentRunId" in run.data.tags:
            client.set_tag(run.info.run_id, "previous_parent_run_id", run.data.tags["mlflow.parentRunId"])
        client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)


@contextlib.contextmanager
def job_run(cfg, resume_run_id: str | None = None, on_start=None):
    """One MLflow run for this job, a child of the sweep's parent run in ``-m`` mode; with
    ``resume_run_id``, the run of an earlier attempt, continued (its failure tag cleared);
    ``on_start(run_id)`` is called as soon as the run exists. A failure
    inside marks the run FAILED with the reason as a tag; an interruption (signal, store or disk
    fault, see ``faults``) marks it KILLED with the reason; then the exception propagates."""
    connect(cfg.tracking)
    parent = os.environ.get(PARENT_ENV) if in_multirun() else None
    previous = existing_run(resume_run_id)
    if previous is None:
        resume_run_id = None
    else:
        adopt_run(previous)
    name = run_name(cfg)
    tags = {
        "backbone": cfg.backbone.name,
        "head": cfg.head.name,
        "optimizer": optimizer_name(cfg.optimizer),
        "trains": what_trains(cfg.backbone)[1],
        "objective": cfg.objective,
        "hydra_overrides": redact(_hydra_overrides()),
    }
    if HydraConfig.initialized():
        tags["output_dir"] = HydraConfig.get().runtime.output_dir
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    trial = cfg.get("hpo_trial")
    if trial:
        tags.update(optuna_trial=str(trial.number), optuna_study=str(trial.study))
    start = dict(run_id=resume_run_id) if resume_run_id else dict(run_name=name, parent_run_id=parent, tags=tags)
    with mlflow.start_run(**start) as run:
        job = JobLog(cfg, run.info.run_id)
        if on_start:  # first of all (the resume state): a kill from here on continues this run
            on_start(run.info.run_id)
        try:
            if previous is not None and FAILURE_TAG in previous.data.tags:
                job._call("delete_tag", mlflow.delete_tag, FAILURE_TAG)
            if previous is not None and trial:  # an interrupted trial's point, continued by its replacement
                job.tags(optuna_trial=str(trial.number), optuna_state="RUNNING")
            config = app_config(cfg)
            # the trial's number and id are tags (optuna_trial): a params value cannot change, and the
            # trial that replaces an interrupted one continues its run
            job.params({k: v for k, v in flatten(config).items() if not k.startswith("hpo_trial.")})
            job._call("log_text", mlflow.log_text, redact(yaml.safe_dump(config, sort_keys=False)), "config.yaml")
            yield job
            if trial:
                job.tags(optuna_state="COMPLETE")
        except Pruned as e:
            mlflow.set_tags({"optuna_state": "PRUNED", "pruned_at_epoch": str(e.epoch)})
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
        except BaseException as e:
            stopped = faults.stop_signal()  # whatever this raised, a signal is stopping the process
            interrupted = isinstance(e, KeyboardInterrupt) or stopped is not None or faults.is_infrastructure(e)
            reason = f"interrupted by {stopped}" if stopped else redact(failure_reason(e))
            with contextlib.suppress(Exception):  # the store may be the fault: best effort
                tags = {FAILURE_TAG: f"interrupted: {reason}" if interrupted else reason}
                if trial:
                    tags["optuna_state"] = "INTERRUPTED" if interrupted else "FAIL"
                mlflow.set_tags(tags)
            with contextlib.suppress(Exception):
                mlflow.end_run(RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED))
            raise


def failure_reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


STATUS_FILE = "job_status.json"


def write_job_status(status: str, name: str, run_id: str | None = None, reason: str | None = None) -> None:
    """What became of this job (finished, reused, failed, interrupted, skipped), in its Hydra output
    folder: the sweep's summary counts these, so a job that never reached MLflow (locked by another
    sweep, a config error) is counted too."""
    if not (HydraConfig.initialized() and in_multirun()):
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps({"status": status, "name": name, "run_id": run_id, "reason": reason}))
        os.replace(tmp, folder / STATUS_FILE)


def read_job_statuses(sweep_dir: Path) -> list[dict]:
    """One record per job folder of the sweep (a folder Hydra made, ``.hydra/`` inside); a job that
    left no record ended without a word (killed) and counts as failed."""
    records = []
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        folder = hydra_dir.parent
        try:
            records.append(json.loads((folder / STATUS_FILE).read_text()))
        except (OSError, ValueError):
            records.append(
                {"status": "failed", "name": folder.name, "run_id": None, "reason": "ended without a result (killed?)"}
            )
    return records


def claim_sweep_dir(config) -> None:
    """Two sweeps started in the same second resolve the same ``hydra.sweep.dir``: the second one moves
    to ``<dir>-2`` (``-3`` ...), for itself and its jobs. A sweep holds its folder's lock until it exits."""
    from filelock import FileLock, Timeout
    from omegaconf import open_dict, read_write

    base = Path(str(config.hydra.sweep.dir))
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".sweep.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        _HELD_LOCKS.append(lock)
        break
    if folder != base:
        log.info("hydra.sweep.dir %s is in use by another sweep: this sweep writes to %s", base, folder)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = str(folder)
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={folder}")
    for old in folder.rglob(STATUS_FILE):  # a re-used folder: records of an earlier sweep
        with contextlib.suppress(OSError):
            old.unlink()


_HELD_LOCKS: list = []


class SweepCallback(Callback):
    """In ``-m`` mode: one MLflow parent run for the sweep (every job is its child; a finished job
    reused from an earlier sweep stays under that sweep's run and is recorded here); at the end, the
    full model of the best run (``tracking.log_model=best``), a summary line, and a non-zero exit if
    any job did not finish here."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.client: MlflowClient | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _preflight(config)
        _fail_fast(config)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if hc.output_subdir:
                redact_files(Path(hc.runtime.output_dir))
            if hc.mode == RunMode.MULTIRUN:
                redact_files(Path(hc.sweep.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _preflight(config, sweep=True)
        claim_sweep_dir(config)
        experiment_id = _fail_fast(config)
        faults.install_handlers()
        if is_study(config):
            return  # the Optuna sweeper opens (or, on resume, reopens) the study's parent run
        self.client = MlflowClient()
        sweep_dir = str(config.hydra.sweep.dir)
        overrides = " ".join(config.hydra.overrides.task)
        run = self.client.create_run(
            experiment_id,
            run_name=f"sweep-{Path(sweep_dir).parent.name}-{Path(sweep_dir).name}",
            tags={
                "sweep": "true",
                "sweep_dir": sweep_dir,
                "hydra_overrides": redact(overrides),
                "objective": str(config.objective),
            },
        )
        self.parent_id = run.info.run_id
        _write_parent_id(config, self.parent_id)
        atexit.register(self._abandon)
        log.info("MLflow parent run %s (%s)", self.parent_id, redact(config.tracking.uri))

    def _abandon(self) -> None:
        """The sweep stopped before on_multirun_end (a signal, a crash): do not leave the parent RUNNING."""
        if self.parent_id and self.client:
            stopped = faults.stop_signal()
            with contextlib.suppress(Exception):
                reason = (
                    f"interrupted by {stopped}: re-run the same command to resume"
                    if stopped
                    else "sweep ended before all jobs returned"
                )
                self.client.set_tag(self.parent_id, FAILURE_TAG, reason)
                self.client.set_terminated(self.parent_id, "KILLED" if stopped else "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        redact_files(sweep_dir)
        study = is_study(config)
        if study:
            self.parent_id = os.environ.get(PARENT_ENV)
            self.client = MlflowClient()
        if not self.parent_id:
            return
        client = self.client
        objective = str(config.objective)
        if study:  # FAIL and PRUNED trials are part of a study: counted by the sweeper, no error
            best = best_run([r for r in self.children() if r.info.status == "FINISHED"], objective)
            self._record_best(config, best, objective)
            os.environ.pop(PARENT_ENV, None)
            client.set_terminated(self.parent_id, "FINISHED")
            return
        jobs = read_job_statuses(sweep_dir)
        by_status: dict[str, list[dict]] = {}
        for job in jobs:
            by_status.setdefault(job["status"], []).append(job)
        reused_ids = [j["run_id"] for j in by_status.get("reused", []) if j.get("run_id")]
        if reused_ids:
            client.set_tag(self.parent_id, "reused_run_ids", ",".join(reused_ids))
        runs = {r.info.run_id: r for r in self.children()}
        for run_id in reused_ids:
            if run_id not in runs and (run := existing_run(run_id)) is not None:
                runs[run_id] = run
        finished = [r for r in runs.values() if r.info.status == "FINISHED"]
        never = [r for r in finished if r.data.tags.get("never_improved") == "true"]
        incomplete = {k: v for k, v in by_status.items() if k not in ("finished", "reused")}
        best = best_run(finished, objective)
        self._record_best(config, best, objective, log_it=not incomplete)
        counts = {s: len(by_status.get(s, [])) for s in ("finished", "failed", "interrupted", "skipped", "reused")}
        for key, n in counts.items():
            client.log_metric(self.parent_id, f"runs_{key}", n)
        summary = (
            f"{counts['finished']} finished, {counts['failed']} failed"
            + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")
            + (f", {counts['skipped']} skipped (running elsewhere)" if counts["skipped"] else "")
            + (f", {counts['reused']} reused" if counts["reused"] else "")
        )
        if never:
            summary += f"; {len(never)} never improved on epoch 0 ({', '.join(r.info.run_name for r in never)})"
        problems = [j for s in ("failed", "interrupted", "skipped") for j in by_status.get(s, [])]
        if problems:
            summary += ": " + "; ".join(
                f"{j['name']} ({j.get('reason') or '?'})"
                if j["status"] == "failed"
                else f"{j['name']} ({j['status']}: {j.get('reason') or '?'})"
                for j in problems
            )
        client.set_tag(self.parent_id, "summary", redact(summary))
        client.set_terminated(self.parent_id, "FAILED" if problems else "FINISHED")
        atexit.unregister(self._abandon)
        os.environ.pop(PARENT_ENV, None)
        if best is not None:
            log.info("best run: %s (%s = %.4f)", best.info.run_name, objective, best.data.metrics[f"best/{objective}"])
        print(redact(summary), flush=True)
        if problems:
            from .train import exit_with

            hint = (
                "; re-run the same command to resume" if "interrupted" in incomplete or "skipped" in incomplete else ""
            )
            exit_with(redact(summary) + hint)

    def _record_best(self, config, best, objective: str, log_it: bool = True) -> None:
        client = self.client
        if best is None:
            return
        client.set_tag(self.parent_id, "best_run_id", best.info.run_id)
        client.set_tag(self.parent_id, "best_run_name", best.info.run_name)
        client.log_metric(self.parent_id, f"best/{objective}", best.data.metrics[f"best/{objective}"])
        for key in ("test/acc", "test/loss"):
            if key in best.data.metrics:
                client.log_metric(self.parent_id, f"best_run/{key}", best.data.metrics[key])
        if str(config.tracking.log_model) != "best":
            return
        if not log_it:
            log.warning(
                "best model not logged: not every job of this sweep finished here; re-run the same "
                "command once they have, and the best run's model is logged then"
            )
        elif "model" not in logged_model_names(best):
            log_best_model(best)

    def children(self):
        return self.client.search_runs(
            [self.client.get_run(self.parent_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'",
            max_results=10000,
        )


def best_run(runs, objective: str):
    """The run with the best ``best/<objective>``; runs that never improved on their untrained epoch 0
    are left out (their figures are the untrained head's)."""
    key = f"best/{objective}"
    scored = [
        r
        for r in runs
        if key in r.data.metrics and math.isfinite(r.data.metrics[key]) and r.data.tags.get("never_improved") != "true"
    ]
    if not scored:
        return None
    sign = 1 if direction(objective) == "minimize" else -1
    return min(scored, key=lambda r: sign * r.data.metrics[key])


def logged_model_names(run) -> set[str]:
    with contextlib.suppress(Exception):
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        )
        return {m.name for m in models}
    return set()


@contextlib.contextmanager
def downloaded_checkpoint(run):
    """The run's ``checkpoint/best.pt``, downloaded to a temporary file for the block's duration."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="checkpoint/best.pt", dst_path=tmp
            )
        except Exception:
            raise UserError(f"run {run.info.run_id} ({run.info.run_name}) has no checkpoint/best.pt") from None
        yield path


def log_best_model(run) -> None:
    """Rebuild the best child's model from its checkpoint and log it as an MLflow model there."""
    from .models import load_checkpoint

    with downloaded_checkpoint(run) as path:
        classifier, ckpt = load_checkpoint(path)
    with mlflow.start_run(run_id=run.info.run_id):
        log_model(classifier, ckpt)
        mlflow.set_tag("model_logged", "best of sweep")
    log.info("logged the full model of the best run %s", run.info.run_name)


def _preflight(config, sweep: bool = False) -> None:
    """Config mistakes, found before anything is created (no mlflow.db, no run): one line, exit 2.
    In a sweep, every value of every swept key is checked (each composed with the others' first)."""
    from .train import check_config, exit_with

    try:
        if sweep and not is_study(config):
            for job_overrides in sweep_points(config):
                check_config(_compose_job(config, job_overrides))
        else:
            check_config(config)
    except UserError as e:
        exit_with(str(e), code=2)


def sweep_points(config) -> list[list[str]]:
    """Job override lists that together try every value of every swept key once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    swept = [(o.get_key_element(), list(o.sweep_string_iterator())) for o in overrides if o.is_sweep_override()]
    first = [f"{k}={v[0]}" for k, v in swept if v]
    points = [fixed + first]
    for i, (key, values) in enumerate(swept):
        for value in values[1:]:
            points.append(fixed + first[:i] + [f"{key}={value}"] + first[i + 1 :])
    return points


def _compose_job(config, job_overrides: list[str]):
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().config_loader().load_sweep_config(config, job_overrides)


def _fail_fast(config) -> str:
    """Before any training: the MLflow store answers and the output folders are writable; else one
    line and a non-zero exit. Returns the experiment id."""
    from .train import exit_with

    try:
        experiment_id = connect(config.tracking)
        hc = config.hydra
        check_writable(
            Path(str(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)),
            "hydra.sweep.dir" if hc.mode == RunMode.MULTIRUN else "hydra.run.dir",
        )
        check_writable(Path(os.path.expanduser(str(config.trainer.resume_dir))), "trainer.resume_dir")
        check_writable(Path(os.path.expanduser(str(config.data.cache_dir))), "data.cache_dir")
    except UserError as e:
        exit_with(str(e))
    return experiment_id


def is_study(config) -> bool:
    """An Optuna sweep (our sweeper), as opposed to Hydra's grid."""
    return str(config.hydra.sweeper.get("_target_", "")).startswith("hydra_plugins.resnet_sweep_optuna")


def _write_parent_id(config, parent_id: str) -> None:
    os.environ[PARENT_ENV] = parent_id
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "mlflow_parent_run_id").write_text(parent_id + "\n")


PARENT_ATTR = "mlflow_parent_run_id"


def open_study_parent(config, study, storage_url: str | None, created: bool = True, wait_s: float = 60) -> str:
    """The study's MLflow parent run: created once per study by the sweep that created the study,
    joined by sweeps working on it at the same time and reopened when a persistent study is
    resumed, so all its trials stay under one run."""
    experiment_id = connect(config.tracking)
    client = MlflowClient()
    parent_id = study.user_attrs.get(PARENT_ATTR)
    if not parent_id and not created:
        parent_id = _parent_of_new_study(study, wait_s)
    if parent_id:
        try:
            client.update_run(parent_id, status="RUNNING")
            client.set_tag(parent_id, "resumed", "true")  # or joined by a sweep on another machine
        except Exception:
            parent_id = None  # another tracking store: start a new parent there
    if not parent_id:
        run = client.create_run(
            experiment_id,
            run_name=f"study-{study.study_name}",
            tags={
                "sweep": "true",
                "optuna_study": study.study_name,
                "storage": redact(storage_url or "memory"),
                "objective": str(config.objective),
                "sweep_dir": str(config.hydra.sweep.dir),
            },
        )
        parent_id = run.info.run_id
        study.set_user_attr(PARENT_ATTR, parent_id)
    client.set_tag(parent_id, "hydra_overrides", redact(" ".join(config.hydra.overrides.task)))
    _write_parent_id(config, parent_id)
    log.info("MLflow parent run %s for study '%s'", parent_id, study.study_name)
    return parent_id


def _parent_of_new_study(study, wait_s: float) -> str | None:
    """Another sweep created this study a moment ago and is opening its parent run: wait for it
    (a study that already has trials but no parent run gets a new one)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not study.get_trials(deepcopy=False):
        parent_id = study.user_attrs.get(PARENT_ATTR)
        if parent_id:
            return parent_id
        time.sleep(0.5)
    return study.user_attrs.get(PARENT_ATTR)


def mark_trial_runs_killed(parent_id: str, trial_number: int, reason: str) -> None:
    client = MlflowClient()
    parent = client.get_run(parent_id)
    for run in client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_id}' and tags.optuna_trial = '{trial_number}' "
            "and attributes.status = 'RUNNING'"
        ),
    ):
        client.set_tag(run.info.run_id, FAILURE_TAG, reason)
        client.set_tag(run.info.run_id, "optuna_state", "FAIL")
        client.set_terminated(run.info.run_id, "KILLED")


def close_study_parent(
    parent_id, study, results, failed: str | None = None, distributions=None, results_file=None, killed: bool = False
) -> None:
    """Study results onto the parent run: best params/value, counts, the results file and Optuna's
    matplotlib plots. On failure, mark the parent FAILED with the reason (``killed``: KILLED, for a
    sweep stopped by a signal, which the same command resumes)."""
    client = MlflowClient()
    if failed is not None:
        client.set_tag(
            parent_id, FAILURE_TAG, redact(failed + (": re-run the same command to resume" if killed else ""))
        )
        client.set_terminated(parent_id, "KILLED" if killed else "FAILED")
        os.environ.pop(PARENT_ENV, None)
        return
    objective = results["objective"]
    for state, n in results["counts"].items():
        client.log_metric(parent_id, f"trials_{state.lower()}", n)
    tags = {
        "summary": ", ".join(f"{n} {s}" for s, n in results["counts"].items()),
        "n_trials": str(results["n_trials"]),
    }
    if "best_value" in results:
        client.log_metric(parent_id, f"best/{objective}", results["best_value"])
        tags["best_trial"] = str(results["best_trial"])
        tags.update({f"best_params.{k}": str(v) for k, v in results["best_params"].items()})
    for key, value in tags.items():
        client.set_tag(parent_id, key, value)
    if results_file:
        client.log_artifact(parent_id, str(results_file))
    for name, fig in study_plots(study, distributions or {}, objective):
        client.log_figure(parent_id, fig, f"plots/{name}.png")
        plots.close(fig)


def study_plots(study, distributions, objective: str):
    """Optuna's own matplotlib plots: history, objective against LR (log x), importances."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    figures = [("optimization_history", lambda: ovm.plot_optimization_history(study, target_name=objective))]
    lr = next((k for k in distributions if k.endswith("lr")), None)
    if lr:
        figures.append(
            (f"objective_vs_{lr.replace('.', '_')}", lambda: ovm.plot_slice(study, params=[lr], target_name=objective))
        )
    if len(distributions) >= 2 and len(complete) >= 2:
        figures.append(("param_importances", lambda: ovm.plot_param_importances(study, target_name=objective)))
    for name, make in figures:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = make()
        except Exception as e:  # e.g. importances with a constant objective
            log.warning("could not plot %s: %s", name, e)
            continue
        ax = ax.flat[0] if hasattr(ax, "flat") else ax
        if (
            name.startswith("objective_vs")
            and isinstance(distributions.get(lr), optuna.distributions.FloatDistribution)
            and distributions[lr].log
        ):
            ax.set_xscale("log")
        yield name, ax.figure
