"""Faults that are not the job's fault: signals, an unreachable store, a full disk.

The rule: a job stopped by one of these is *interrupted*, never *failed*. Its last finished epoch is
kept for resume, its MLflow run is marked KILLED with the reason, and re-running the same command
continues it in the same run. Tracking calls are retried for ``tracking.retry_s`` seconds first,
so a store that restarts (a server, a database) costs nothing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from resnet_sweep.core.errors import Diverged, UserError, first_line
from resnet_sweep.core.registry import PROCESS

log = logging.getLogger(__name__)

_stop = PROCESS.state("faults.stop", {"signal": None, "deferred": 0, "fault": None})  # the stop flag


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what SLURM sends on preemption or a time limit) or SIGINT (Ctrl-C)."""

    def __init__(self, name: str):
        super().__init__(f"interrupted by {name}")
        self.name = name


class Stopped(KeyboardInterrupt):
    """The infrastructure stopped a job of a sweep (a full disk, a store unreachable past its retry
    time): the sweep stops with it, exit status 75, instead of starting job after job into the same
    wall. A KeyboardInterrupt, so that Hydra's launcher lets it through as it does a signal."""

    code = 75  # EX_TEMPFAIL: try again later


def stop_sweep(message: str) -> Stopped:
    """The exception that stops this sweep, its one line ``message``; remembered for the clean-up
    that marks the sweep's parent run KILLED (``stop_fault``)."""
    _stop["fault"] = message
    return Stopped(message)


def stop_fault() -> str | None:
    """Why the infrastructure stopped this sweep (``stop_sweep``), if it did."""
    return _stop.get("fault")


SWEEP_PID_ENV = "RESNET_SWEEP_PID"


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"  # a SLURM job elsewhere may have the sweep's pid


def mark_sweep_process() -> None:
    """Called where a sweep starts: its jobs that run in this same process (Hydra's basic launcher)
    stop the sweep on an infrastructure fault; jobs of other launchers, in other processes, cannot."""
    os.environ[SWEEP_PID_ENV] = _this_process()
    _stop["fault"] = None


def in_sweep_process() -> bool:
    return os.environ.get(SWEEP_PID_ENV) == _this_process()


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _stop["signal"] is not None:
        if signum == signal.SIGINT:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        return  # already stopping: let the clean-up finish
    _stop["signal"] = name
    log.warning("%s received: saving and stopping", name)
    if not _stop["deferred"]:
        raise Interrupted(name)


def install_handlers() -> None:
    """SIGTERM and SIGINT stop the process through ``Interrupted`` (a KeyboardInterrupt), so every
    ``finally`` and every run-closing handler runs. Main thread only (where Python runs handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which shuts them down: a worker
    that died of Ctrl-C first used to fail the job with "DataLoader worker exited unexpectedly"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def deferred(stop_after: bool = True):
    """A signal arriving inside this block stops the process at its end instead of in the middle
    (where torch would print a traceback for a DataLoader iterator half built or half shut down).
    ``stop_after=False`` in clean-up code (a ``finally``), which must not raise: the next
    ``check`` stops the process."""
    _stop["deferred"] += 1
    try:
        yield
    finally:
        _stop["deferred"] -= 1
    if stop_after:
        check()


def check() -> None:
    """Raise ``Interrupted`` if a signal has asked this process to stop. The handler raises at once,
    but where it lands inside code that swallows exceptions (a ``__del__``: a DataLoader iterator
    shutting its workers down at the end of an epoch) the stop would be lost; the training loop calls
    this at every batch and every job start, so a stop is never lost."""
    if _stop["signal"] is not None:
        raise Interrupted(_stop["signal"])


def stop_signal() -> str | None:
    """The signal that is stopping this process, if any."""
    return _stop["signal"]


def exit_code(e: BaseException | None = None) -> int:
    """The exit status of a process stopped by ``e``: 75 for ``Stopped``, 128 + the signal's number."""
    if isinstance(e, Stopped):
        return Stopped.code
    name = _stop["signal"] or "SIGINT"
    return 128 + int(getattr(signal, name))


_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
_CONNECTION_WORDS = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "max retries exceeded",
    "failed to establish",
    "timed out",
    "server closed the connection",
    "could not connect",
    "connection to server",
    "terminating connection",
    "connection is closed",
    "temporarily unavailable",
    "service unavailable",
    "bad gateway",
    "database is locked",
    "cannot reach the mlflow store",
    "no space left on device",
    "disk quota exceeded",
    "database or disk is full",
    "the database system is",
    "ssl syscall error",
    "api request to",
)


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_infrastructure(e: BaseException) -> bool:
    """A fault of the machine or a service (store or database unreachable, disk full), not of the job:
    looked for along the exception's chain, by type and by the drivers' messages."""
    for err in _chain(e):
        name = type(err).__name__
        if isinstance(err, OSError) and err.errno in _DISK:
            return True
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if name in (
            "OperationalError",
            "InterfaceError",
            "StoreUnreachable",
            "StorageUnavailable",
            "ConnectTimeout",
            "ReadTimeout",
        ):
            return True
        module = type(err).__module__ or ""
        if module.startswith(("requests", "urllib3", "sqlalchemy", "psycopg", "mlflow")) and any(
            w in str(err).lower() for w in _CONNECTION_WORDS
        ):
            return True
    return False


_FULL_WORDS = ("no space left on device", "disk quota exceeded", "database or disk is full")


def is_disk_full(e: BaseException) -> bool:
    """The exception says it: ENOSPC or EDQUOT along its chain, or the words of one."""
    return any(
        (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT))
        or any(w in str(err).lower() for w in _FULL_WORDS)
        for err in _chain(e)
    )


MIN_FREE = 1 << 20  # a folder whose write failed with less free than this (or than the write needed) is full


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class DiskFull(OSError):
    """A write failed for lack of space in ``folder``, whatever the writer raised (``torch.save``
    says ``unexpected pos 64 vs 0``, SQLite ``database or disk is full``): ENOSPC, an infrastructure
    fault, with one line naming the folder and the space needed."""

    def __init__(self, folder: str | os.PathLike | None, *, free: int | None, need: int = 0):
        self.folder = str(Path(os.path.expanduser(str(folder))).absolute()) if folder else None
        self.free, self.need = free, need
        where = f" in {self.folder}" if self.folder else ""
        space = ([f"{size_text(free)} free"] if free is not None else []) + (
            [f"about {size_text(need)} needed"] if need else []
        )
        super().__init__(errno.ENOSPC, f"No space left on device{where}" + (f" ({', '.join(space)})" if space else ""))

    def __str__(self) -> str:
        return str(self.strerror)


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the file system of ``folder`` (or of its nearest existing parent)."""
    path = Path(os.path.expanduser(str(folder))).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(e: BaseException, folders: Mapping[str | os.PathLike, int]) -> DiskFull | None:
    """``e`` as a full disk when it is one, else None. ``folders``: where the failed work writes
    (folder -> bytes the write needed there, 0 when unknown). Free space is measured, not only the
    message read: a folder with less free than the write needed (at least ``MIN_FREE``) is full,
    whatever exception the writer raised; a message that says so names the fullest folder."""
    for err in _chain(e):
        if isinstance(err, DiskFull):
            return err
    if not isinstance(e, Exception) or (isinstance(e, (UserError, Diverged)) and not is_disk_full(e)):
        return None  # a signal, a mistake in the config or the data, a loss that diverged: not a write
    measured = []
    for i, (folder, need) in enumerate(folders.items()):
        free = free_bytes(folder)
        if free is not None:
            measured.append((free < max(need, MIN_FREE), -free, -i, folder, free, need))
    said = is_disk_full(e)
    if not said and is_infrastructure(e):
        return None  # a connection fault: the folders' space is not why
    if measured:
        short, _, _, folder, free, need = max(measured)
        if short:
            return DiskFull(folder, free=free, need=need)
    if not said:
        return None
    named = [err for err in _chain(e) if isinstance(err, OSError) and (err.filename2 or err.filename)]
    if named:  # the file the writer named (a copy's destination)
        folder = os.path.dirname(os.path.abspath(str(named[0].filename2 or named[0].filename)))
        return DiskFull(folder, free=free_bytes(folder))
    return DiskFull(max(measured)[3], free=max(measured)[4]) if measured else DiskFull(None, free=None)


@contextlib.contextmanager
def quiet(*loggers: str):
    """Those loggers' records dropped inside the block: best-effort writes to a store that may be the
    fault (MLflow logs each failed SQL statement with its traceback before raising)."""
    saved = [(logging.getLogger(name), logging.getLogger(name).disabled) for name in loggers]
    for logger, _ in saved:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in saved:
            logger.disabled = disabled


STORE_LOGGERS = ("mlflow.store.db.utils", "mlflow.utils.rest_utils", "urllib3.connectionpool")


@contextlib.contextmanager
def writing(folder: str | os.PathLike, need: int = 0):
    """A write of about ``need`` bytes into ``folder``: a failure for lack of space there raises
    ``DiskFull`` (from the writer's exception), whatever the writer raised."""
    try:
        yield
    except Exception as e:
        full = disk_full(e, {folder: need})
        if full is None or full is e:
            raise
        raise full from e


def retrying(fn, seconds: float, what: str):
    """``fn()``, retried on connection faults for up to ``seconds`` (backoff 1, 2, 4 .. 15 s), with one
    warning line per outage. A full disk is not retried: waiting rarely frees space."""
    deadline = time.monotonic() + max(0.0, float(seconds))
    delay, warned = 1.0, False
    while True:
        try:
            result = fn()
        except Exception as e:
            if not is_infrastructure(e) or is_disk_full(e) or time.monotonic() + delay > deadline:
                raise
            if not warned:
                first = first_line(e)
                log.warning("%s failed (%s): retrying for up to %.0f s", what, first[:200], seconds)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
            continue
        if warned:
            log.warning("%s: the store answers again", what)
        return result
