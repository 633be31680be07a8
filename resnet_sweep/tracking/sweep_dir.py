"""The sweep's folder: claimed by one sweep at a time, and one record per job of what became of it
(the sweep's summary counts these, so a job that never reached MLflow is counted too)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from resnet_sweep.core import sealed
from resnet_sweep.core.context import PARENT_FILE, JobContext
from resnet_sweep.core.registry import PROCESS

log = logging.getLogger(__name__)


STATUS_FILE = "job_status.json"


def write_job_status(
    ctx: JobContext, status: str, name: str, run_id: str | None = None, reason: str | None = None
) -> None:
    """What became of this job (finished, reused, failed, interrupted, skipped), in its Hydra output
    folder (a sweep's job only): the sweep's summary counts these, so a job that never reached MLflow
    (locked by another sweep, a config error) is counted too."""
    if not ctx.multirun or ctx.output_dir is None:
        return
    folder = Path(ctx.output_dir)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        record = {"status": status, "name": name, "run_id": run_id, "reason": reason}
        sealed.write_text(folder / STATUS_FILE, json.dumps(record))


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
    for old in [*folder.rglob(STATUS_FILE), folder / PARENT_FILE]:  # a re-used folder: an earlier sweep's
        with contextlib.suppress(OSError):
            old.unlink()


_HELD_LOCKS: list = []  # the sweep folders' locks this process holds until it exits


def _release_locks() -> None:
    for lock in _HELD_LOCKS:
        with contextlib.suppress(Exception):
            lock.release(force=True)
    _HELD_LOCKS.clear()


PROCESS.on_reset("sweep_dir.locks", _release_locks)  # a process's locks end with it
