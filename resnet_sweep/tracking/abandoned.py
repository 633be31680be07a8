"""Runs that a killed sweep left RUNNING (SIGKILL, an OOM kill, power loss: no clean-up ran), closed by
the next sweep: a grid sweep's parent run whose sweep folder is here and whose folder lock no live
process holds, and its children still RUNNING, are marked KILLED with a note saying why and, when the
new sweep is the same command, which parent run took their jobs over."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from filelock import FileLock, Timeout

from resnet_sweep.core.redaction import redact

log = logging.getLogger(__name__)

FAILURE_TAG = "failure_reason"


def sweep_is_dead(folder: Path) -> bool:
    """The sweep folder is here and no live process holds its lock (``sweep_dir.claim_sweep_dir``):
    the kernel releases a killed process's lock."""
    lock_file = folder / ".sweep.lock"
    if not lock_file.exists():
        return False
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return False
    lock.release()
    return True


def close_abandoned_sweeps(
    client, experiment_id: str, *, parent_id: str, overrides: str, own_dir: Path | None = None
) -> list[str]:
    """Mark KILLED the grid sweeps' parent runs of ``experiment_id`` whose process died (RUNNING,
    ``sweep_dir`` here and its lock free, or the folder ``own_dir`` this sweep holds now), with their
    children still RUNNING; the new sweep's parent ``parent_id`` is named where its ``overrides``
    are theirs (the same command, re-run). Returns the ids of the parents closed. Best effort: a
    store that refuses is a warning."""
    closed = []
    try:
        parents = client.search_runs(
            [experiment_id], filter_string="tags.sweep = 'true' and attributes.status = 'RUNNING'", max_results=1000
        )
    except Exception as e:
        log.warning("could not look for sweeps left RUNNING: %s", e)
        return closed
    for run in parents:
        tags = run.data.tags
        folder = tags.get("sweep_dir")
        if run.info.run_id == parent_id or "optuna_study" in tags or not folder:
            continue
        mine = own_dir is not None and Path(folder).absolute() == own_dir.absolute()
        if not (mine or sweep_is_dead(Path(folder))):
            continue
        same = tags.get("hydra_overrides") == redact(overrides)
        note = "interrupted: its sweep process ended without closing it (killed?)" + (
            f"; the same command, re-run, continues its jobs under parent run {parent_id}" if same else ""
        )
        with contextlib.suppress(Exception):
            for child in client.search_runs(
                [experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'",
                max_results=1000,
            ):
                client.set_tag(child.info.run_id, FAILURE_TAG, "interrupted: its sweep process ended (killed?)")
                client.set_terminated(child.info.run_id, "KILLED")
            client.set_tag(run.info.run_id, FAILURE_TAG, note)
            if same:
                client.set_tag(run.info.run_id, "taken_over_by", parent_id)
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
            log.info(
                "MLflow parent run %s (%s) was left RUNNING by a killed sweep: marked KILLED", run.info.run_id, folder
            )
    return closed
