"""Trial bookkeeping: trials are asked, owned (host, pid, heartbeat), told, and released when their
sweep died or the infrastructure stopped their job (a FAIL that does not count; the params are
retried as a new trial, up to ``MAX_RETRIES`` times)."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import warnings
from collections import Counter

import optuna
from hydra.core.utils import JobStatus
from optuna.trial import TrialState

from resnet_sweep.core.errors import first_line
from resnet_sweep.core.redaction import redact
from resnet_sweep.tracking import hpo
from resnet_sweep.tracking.optuna_storage import StorageUnavailable, outage_of

from . import _study_runs

log = logging.getLogger(__name__)

OWNER = "resnet_sweep:owner"
RELEASED = "resnet_sweep:released"  # interrupted or surplus: FAIL that does not count
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
MAX_RETRIES = 3  # an interrupted trial's params are tried again this many times, then a new point is drawn


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat:
    """Marks this process's running trials alive in the storage, every ``interval`` seconds."""

    def __init__(self, storage, interval: int):
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="optuna-heartbeat")

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            for trial_id in list(self.trial_ids):
                try:
                    owner = self.storage.get_trial_system_attrs(trial_id).get(OWNER, {})
                    self.storage.set_trial_system_attr(trial_id, OWNER, {**owner, "heartbeat": time.time()})
                except Exception:  # finished meanwhile, or a transient database error
                    pass

    def stop(self):
        self._stop.set()


class TrialBookkeeping:
    """The trial part of ``OptunaSweeperImpl`` (which sets ``config``, ``storage``, ``storage_url``,
    ``n_trials``, ``grace_s``, ``in_process``, ``custom_search_space`` and ``parent_id``)."""

    def _trials(self, study):
        return study.get_trials(deepcopy=False)

    def _counts(self, study) -> Counter:
        return Counter(t.state.name for t in self._trials(study) if not t.system_attrs.get(RELEASED))

    def _release(self, trial_id: int, why: str) -> None:
        self.storage.set_trial_system_attr(trial_id, RELEASED, why)
        self.storage.set_trial_state_values(trial_id, TrialState.FAIL)

    @staticmethod
    def _retry_params(study, frozen) -> bool:
        """Queue the params of an interrupted trial as a new WAITING trial (Optuna's callback for
        trials whose worker was lost), up to MAX_RETRIES times. False: retried enough, a new point."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            callback_class = (
                getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                or optuna.storages.RetryFailedTrialCallback
            )
            callback_class(max_retry=MAX_RETRIES)(study, frozen)
        return len(frozen.system_attrs.get("retry_history", [])) < MAX_RETRIES

    def _interrupted(self, study, trial_id: int, why: str) -> bool:
        """Release an interrupted trial (FAIL that does not count) and retry its params. False: it
        had finished meanwhile (released by another sweep). Of several sweeps releasing it at once,
        the one whose FAIL lands queues the retry; the others get UpdateFinishedTrialError."""
        frozen = self.storage.get_trial(trial_id)
        if frozen.state != TrialState.RUNNING:
            return False
        self._release(trial_id, why)
        # the copy is a new trial of this study: not owned, not released
        system_attrs = {k: v for k, v in frozen.system_attrs.items() if k not in (OWNER, RELEASED)}
        retried = self._retry_params(
            study,
            optuna.trial.FrozenTrial(
                number=frozen.number,
                state=frozen.state,
                value=None,
                values=None,
                datetime_start=frozen.datetime_start,
                datetime_complete=None,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs=frozen.user_attrs,
                system_attrs=system_attrs,
                intermediate_values={},
                trial_id=frozen._trial_id,
            ),
        )
        try:  # the job marks its run KILLED itself when it can
            _study_runs.mark_trial_runs_killed(self.parent_id, frozen.number, why)
        except Exception as e:  # the tracking store is what stopped it
            log.warning(
                "trial %d: could not mark its MLflow run: %s",
                frozen.number,
                redact(first_line(e)),
            )
        log.warning(
            "trial %d was interrupted (%s): not counted, %s",
            frozen.number,
            why,
            "its params are tried again" if retried else "a new point replaces it",
        )
        return True

    def _release_interrupted(self, study) -> int:
        """RUNNING trials whose sweep process died -> FAIL (released, replaced)."""
        if self.storage_url is None:
            return 0
        host, now, n = socket.gethostname(), time.time(), 0
        for t in self._trials(study):
            if t.state != TrialState.RUNNING:
                continue
            owner = t.system_attrs.get(OWNER) or {}
            last = owner.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else 0)
            # no heartbeat reached the database during an outage: count from its end
            last = max(last, outage_of(self.storage_url).ended_at)
            dead = owner.get("host") == host and not _alive(int(owner.get("pid", -1)))
            if dead or now - last > self.grace_s:
                try:
                    if not self._interrupted(study, t._trial_id, "sweep interrupted"):
                        continue
                except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                    continue  # another sweep process released it first
                n += 1
        return n

    def _take(self, study, distributions) -> optuna.Trial | None:
        """Ask one trial; release it if a parallel sweep filled the study meanwhile."""
        trial = study.ask(fixed_distributions=distributions)
        self.storage.set_trial_system_attr(
            trial._trial_id, OWNER, {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        )
        counted = [t for t in self._trials(study) if not t.system_attrs.get(RELEASED) and t.number <= trial.number]
        if len(counted) > self.n_trials:
            self._release(trial._trial_id, "surplus")
            return None
        if self.custom_search_space:
            self.custom_search_space(self.config, trial)
        return trial

    def _overrides(self, trial, fixed: dict[str, str], study) -> list[str]:
        params = {**{k: v for k, v in trial.params.items()}, **fixed}
        overrides = [f"{k}={v}" for k, v in params.items()]
        report = "true" if (self.storage_url is not None or self.in_process) else "false"
        overrides += [
            f"+hpo_trial.number={trial.number}",
            f"+hpo_trial.id={trial._trial_id}",
            f"+hpo_trial.study='{study.study_name}'",
            f"+hpo_trial.report={report}",
        ]
        return overrides

    @staticmethod
    def _safe_tell(study, trial, *args, **kwargs) -> None:
        try:
            # skip_if_finished: another sweep released it (no heartbeat while the database was down)
            study.tell(trial, *args, skip_if_finished=True, **kwargs)
        except RuntimeError as e:  # GridSampler calls study.stop() once the grid is exhausted
            if "Study.stop" not in str(e):
                raise

    @staticmethod
    def _infrastructure_stop(ret) -> bool:
        """The job did not finish because of the infrastructure (storage or tracking store down,
        a signal), not because of the trial."""
        if ret.status == JobStatus.COMPLETED:
            return isinstance(ret.return_value, str) and ret.return_value == hpo.INTERRUPTED
        return isinstance(ret._return_value, StorageUnavailable)

    def _tell(self, study, trial, ret) -> str:
        if self._infrastructure_stop(ret):
            self._interrupted(study, trial._trial_id, "interrupted by the infrastructure")
            return "INTERRUPTED"
        if ret.status != JobStatus.COMPLETED:
            reason = first_line(ret._return_value) if ret._return_value else "job failed"
            log.warning("trial %d failed: %s", trial.number, redact(reason))
            self._safe_tell(study, trial, state=TrialState.FAIL)
            return "FAIL"
        value = ret.return_value
        if value == hpo.PRUNED:
            self._safe_tell(study, trial, state=TrialState.PRUNED)
            return "PRUNED"
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            self._safe_tell(study, trial, state=TrialState.FAIL)
            return "FAIL"
        self._safe_tell(study, trial, value)
        return "COMPLETE"
