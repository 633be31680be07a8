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
import signal
import threading
import time

from .errors import first_line

log = logging.getLogger(__name__)

_stop: dict = {"signal": None, "deferred": 0}


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what SLURM sends on preemption or a time limit) or SIGINT (Ctrl-C)."""

    def __init__(self, name: str):
        super().__init__(f"interrupted by {name}")
        self.name = name


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


def exit_code() -> int:
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


def is_disk_full(e: BaseException) -> bool:
    return any(
        (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT))
        or "no space left on device" in str(err).lower()
        for err in _chain(e)
    )


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
