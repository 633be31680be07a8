"""Resumable jobs: after every epoch, a checkpoint of everything that continues the job exactly.

A job is identified by its resolved config (the app config, without Hydra's node), not by its
time-stamped output folder, so re-running the same ``python train.py [-m] ...`` command finds it.
The state lives in ``trainer.resume_dir`` (default ``.resnet-sweep/resume`` where you run, beside
``mlflow.db``), written atomically (temp file + rename) and read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from resnet_sweep.core import faults, sealed
from resnet_sweep.core.errors import Locked

log = logging.getLogger(__name__)

FORMAT = "resnet-sweep-resume/1"


def job_key(app_config: dict) -> str:
    return sealed.json_key(app_config, 20)


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Resumer:
    """Saves and restores one job's state; holds a lock so one job key runs in one process."""

    def __init__(self, folder: str | os.PathLike, app_config: dict, enabled: bool = True, wait: bool = False):
        self.enabled, self.wait = enabled, wait
        self.key = job_key(app_config)
        self.folder = Path(os.path.expanduser(str(folder)))
        self.path = self.folder / f"{self.key}.pt"
        self._lock = None

    # ------------------------------------------------------------------ job level
    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.folder / f"{self.key}.lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            if self.wait:
                log.info("another process runs this very job (%s): waiting for it, then using its result", self.key)
                self._lock.acquire()
                return self._fresh_if_disabled()
            raise Locked(
                f"this job ({self.key}) is running in another process right now "
                f"(lock {self._lock.lock_file}); wait for it or set trainer.resume=false"
            ) from None
        return self._fresh_if_disabled()

    def _fresh_if_disabled(self):
        if not self.enabled and self.path.exists():
            self.path.unlink()  # trainer.resume=false: start fresh
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()
        return False

    def load(self) -> dict | None:
        if not (self.enabled and self.path.exists()):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            log.warning("resume state %s unreadable (%s): starting fresh", self.path, e)
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            return None
        return state

    def _write(self, state: dict) -> None:
        """Written beside the state, then renamed (atomic: a kill leaves the previous epoch's state
        intact); a failed write leaves no temp file, and one for lack of space is ``faults.DiskFull``."""
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            with faults.writing(self.folder, need=_nbytes(state)):
                torch.save(state, tmp)
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def started(self, run_id: str) -> None:
        """Remember the MLflow run before the first epoch, so even a kill during epoch 0 resumes it."""
        if self.enabled and not self.path.exists():
            self._write({"format": FORMAT, "key": self.key, "run_id": run_id, "epoch": -1, "finished": False})

    def finished(self, run_id: str, objective: float) -> None:
        if self.enabled:
            self._write(
                {
                    "format": FORMAT,
                    "key": self.key,
                    "run_id": run_id,
                    "epoch": None,
                    "finished": True,
                    "objective": float(objective),
                }
            )

    # ------------------------------------------------------------------ epoch level (engine.fit)
    def save(self, run_id: str, epoch: int, model, optimizer, scheduler, history) -> None:
        if not self.enabled:
            return
        from resnet_sweep.training.models import trainable_state

        self._write(
            {
                "format": FORMAT,
                "key": self.key,
                "run_id": run_id,
                "epoch": epoch,
                "finished": False,
                "model": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "history": {
                    "epochs": history.epochs,
                    "best_epoch": history.best_epoch,
                    "best_value": history.best_value,
                    "best_state": history.best_state,
                },
            }
        )

    @staticmethod
    def restore(state: dict, model, optimizer, scheduler, history) -> int:
        """Put the job back where its last completed epoch left it; return the next epoch."""
        if state is None or state.get("epoch", -1) < 0 or "model" not in state:
            return 0
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        h = state["history"]
        history.epochs[:] = h["epochs"]
        history.best_epoch, history.best_value, history.best_state = h["best_epoch"], h["best_value"], h["best_state"]
        return int(state["epoch"]) + 1


def _nbytes(obj) -> int:
    """About the bytes ``torch.save`` writes for ``obj``: its tensors' bytes, 64 for anything else."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0 if obj is None else 64


class EpochHooks:
    """What engine.fit calls: restore a previous attempt of this job, save after every epoch."""

    def __init__(self, resumer: Resumer, state: dict | None, job):
        self.resumer, self.state, self.job = resumer, state, job

    def restore(self, model, optimizer, scheduler, history) -> int:
        start = Resumer.restore(self.state, model, optimizer, scheduler, history)
        if start:
            log.info("%s: resuming MLflow run %s at epoch %d", self.job.name, self.job.run_id, start)
            self.job.tags(resumed_at_epoch=start)
            self.job.ensure_logged(history.epochs)
        return start

    def save(self, epoch, model, optimizer, scheduler, history) -> None:
        self.resumer.save(self.job.run_id, epoch, model, optimizer, scheduler, history)
