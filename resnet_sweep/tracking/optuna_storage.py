"""An Optuna storage that rides out database outages.

``RetryingStorage`` wraps Optuna's own storage (``RDBStorage`` behind Optuna's trial cache, as
``optuna.storages.get_storage`` builds it) and retries every call that failed because the database
could not be reached (SQLAlchemy's OperationalError / InterfaceError / DisconnectionError, also when
Optuna re-raised them as StorageInternalError) for up to ``retry_s`` seconds from the start of the
outage. An outage is one warning line, a recovery one info line; past ``retry_s`` a call raises
``StorageUnavailable`` (one line, no traceback). Any other error is raised at once.

The outage clock is per database URL and per process, so the sweeper, its heartbeat thread and an
in-process job share one outage (one warning, one deadline). Used by the sweeper plugin and by a
job's per-epoch reports (``hpo.reporter``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import BaseStorage

from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.core.redaction import redact
from resnet_sweep.core.registry import PROCESS

log = logging.getLogger(__name__)

STORAGE_RETRY_S = 120  # hydra.sweeper.storage_retry_s when the sweeper's config has none


class StorageUnavailable(Exception):
    """The Optuna storage stayed unreachable for longer than ``hydra.sweeper.storage_retry_s``:
    an infrastructure stop, not a failure of the trial (a job returns ``INTERRUPTED`` for it)."""


def engine_kwargs(url: str) -> dict:
    """Check a pooled connection before using it (a restarted server leaves dead ones in the pool)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 15}}
    return {"pool_pre_ping": True}


def is_outage(e: BaseException) -> bool:
    """A lost or refused database connection (or a locked SQLite file), not bad data or a bug."""
    from sqlalchemy import exc

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError, exc.TimeoutError)):
            return True
        if isinstance(e, exc.DBAPIError) and e.connection_invalidated:
            return True
        e = e.__cause__ or e.__context__
    return False


def storage_error(e: BaseException) -> str:
    """The first line of what the database said (not of SQLAlchemy's or Optuna's wrapper)."""
    e = getattr(e, "orig", None) or e  # SQLAlchemy's wrapper -> the driver's own message
    while isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
        e = getattr(e.__cause__, "orig", None) or e.__cause__  # Optuna's "exceeding max length" guess -> the cause
    return first_line(e)


class _Outage:
    """One database's outage state in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None  # monotonic start of the current outage
        self.ended_at: float = 0.0  # time.time() when the last outage ended


_OUTAGES: dict[str, _Outage] = PROCESS.state("optuna_storage.outages")
_OUTAGES_LOCK = threading.Lock()


def outage_of(url: str) -> _Outage:
    with _OUTAGES_LOCK:
        return _OUTAGES.setdefault(url, _Outage())


class _OutageNoise(logging.Filter):
    """SQLAlchemy's pool logs a traceback when it cannot reset a connection the server dropped, and
    Optuna a multi-line warning when a query fails: during an outage, our one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_outage(record.exc_info[1]):
            return False
        message = str(record.msg)
        return not ("Caught an error from sqlalchemy" in message and "connection" in message.lower())


def _quiet_reconnect_noise() -> None:
    for name in ("sqlalchemy.pool", "sqlalchemy.pool.impl.QueuePool", "optuna.storages._rdb.storage"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OutageNoise) for f in logger.filters):
            logger.addFilter(_OutageNoise())


def retry(url: str, retry_s: float, what: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried through a database outage of up to ``retry_s`` seconds."""
    outage = outage_of(url)
    delay = 0.5
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not is_outage(e):
                raise
            with outage.lock:
                if outage.since is None:
                    outage.since = time.monotonic()
                    log.warning(
                        "the Optuna storage %s is unreachable (%s): retrying for up to %g s "
                        "(hydra.sweeper.storage_retry_s)",
                        redact(url),
                        redact(storage_error(e)),
                        retry_s,
                    )
                left = outage.since + retry_s - time.monotonic()
            if left <= 0:
                reason = redact(storage_error(e))
                log.debug("gave up %s after %g s: %s", what, retry_s, reason)
                error = StorageUnavailable(
                    f"the Optuna storage {redact(url)} has been unreachable for {retry_s:g} s ({reason})"
                )
                error.seconds, error.reason = retry_s, reason
                raise error from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)
            continue
        if outage.since is not None:
            with outage.lock:
                if outage.since is not None:
                    log.info(
                        "the Optuna storage %s is reachable again after %.0f s",
                        redact(url),
                        time.monotonic() - outage.since,
                    )
                    outage.since, outage.ended_at = None, time.time()
        return result


def _retried(name: str):
    def method(self, *args, **kwargs):
        return self._call(name, *args, **kwargs)

    method.__name__ = name
    return method


class RetryingStorage(BaseStorage):
    """``base`` (any Optuna storage), each call retried through an outage of ``retry_s`` seconds."""

    def __init__(self, base: BaseStorage, url: str, retry_s: float) -> None:
        self._base, self._url, self._retry_s = base, url, float(retry_s)
        _quiet_reconnect_noise()

    def _call(self, name: str, *args, **kwargs):
        attempts = [0]

        def once():
            attempts[0] += 1
            try:
                return getattr(self._base, name)(*args, **kwargs)
            except optuna.exceptions.UpdateFinishedTrialError:
                # a write that reached the database before the connection dropped is not redone
                if attempts[0] > 1 and name == "set_trial_state_values":
                    trial_id, state = args[0], kwargs.get("state", args[1] if len(args) > 1 else None)
                    if self._base.get_trial(trial_id).state == state:
                        return True
                raise

        return retry(self._url, self._retry_s, f"calling {name}", once)

    def __getattr__(self, name: str) -> Any:  # anything else a caller reaches for: the base's
        if name.startswith("__") or "_base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._base, name)


for _name in sorted(n for n in dir(BaseStorage) if not n.startswith("_") and callable(getattr(BaseStorage, n))):
    setattr(RetryingStorage, _name, _retried(_name))
RetryingStorage.__abstractmethods__ = frozenset()


def open_storage(url: str, retry_s: float) -> RetryingStorage:
    """Optuna's storage for ``url`` (its RDBStorage behind its trial cache), opened and used through
    outages of up to ``retry_s`` seconds."""
    rdb = retry(url, retry_s, "opening it", optuna.storages.RDBStorage, url, engine_kwargs=engine_kwargs(url))
    return RetryingStorage(optuna.storages.get_storage(rdb), url, retry_s)


def open_study_storage(url: str | None, retry_s: float = STORAGE_RETRY_S, attempts: int = 5):
    """The study's storage: Optuna's RDBStorage behind its trial cache, every call retried through
    database outages of up to ``retry_s``. Several sweeps opening a new database at the same moment
    race to create its tables: the losers retry. A database unreachable at the start is one line
    naming the key (nothing has run yet: no reason to wait)."""
    if url is None:
        return optuna.storages.InMemoryStorage()
    for attempt in range(attempts):
        try:
            rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
            return RetryingStorage(optuna.storages.get_storage(rdb), url, retry_s)
        except Exception as e:
            from sqlalchemy.exc import IntegrityError, ProgrammingError

            if isinstance(e, (IntegrityError, ProgrammingError)) and attempt + 1 < attempts:
                time.sleep(1 + attempt)  # another sweep is creating the tables
                continue
            raise UserError(
                f"hydra.sweeper.storage={redact(url)}: cannot open the Optuna storage "
                f"({redact(storage_error(e))}); check the URL, that the database "
                "server runs and the credentials (PGPASSWORD or ~/.pgpass)"
            ) from None
