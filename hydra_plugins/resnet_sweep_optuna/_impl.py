"""The Optuna sweeper: ask a batch of trials, launch them as Hydra jobs, tell the results.

- Search space from ``params`` and command-line sweeps, in hydra-optuna-sweeper's syntax:
  ``choice(a, b)`` / ``a,b`` -> categorical, ``range(a, b, step=s)`` -> int (or float) with step,
  ``interval(a, b)`` -> uniform, ``tag(log, interval(a, b))`` -> log-uniform.
- Persistent and resumable: with a ``storage``, the study continues until it holds ``n_trials``
  finished trials (COMPLETE, PRUNED or FAIL). RUNNING trials whose sweep died (same host and its
  process gone, or no heartbeat for ``grace_s``) are marked FAIL as *interrupted* and replaced:
  they do not count. Several sweep processes on one study share it; trial numbers past
  ``n_trials`` taken in a race are released the same way.
- One study, one experiment: a study records its data's fingerprint and its fixed config (the app
  config without the searched params and the keys that do not change results) in its user attrs.
  ``%id%`` in ``study_name`` (the ``hpo=`` presets) is a digest of both, so other data or settings
  make another study; a named study resumed or joined with other data or settings is refused in one
  line naming what differs.
- Database outages: every storage call of the sweeper and of the jobs' reports is retried for
  ``storage_retry_s``. A job stopped by the infrastructure (it returns ``hpo.INTERRUPTED``) does
  not count: its trial is released and its params are retried as a new trial (Optuna's
  RetryHeartbeatStaleTrialCallback). A storage down for longer stops the sweep in one line; the
  same command resumes it.
- NaN-safe: a job that returns NaN/inf or raises is a FAIL trial and the study goes on, up to
  ``max_failure_rate``.
- Pruning: jobs report the objective per epoch to their trial (resnet_sweep.hpo) and stop when the
  pruner says so; the sweeper tells PRUNED.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from resnet_sweep import data, hpo, tracking
from resnet_sweep.engine import direction as objective_direction
from resnet_sweep.errors import UserError

from ._storage import RetryingStorage, engine_kwargs, first_line, outage_of

log = logging.getLogger(__name__)

OWNER = "resnet_sweep:owner"
RELEASED = "resnet_sweep:released"  # interrupted or surplus: FAIL that does not count
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
MAX_RETRIES = 3  # an interrupted trial's params are tried again this many times, then a new point is drawn

# what identifies a study (its user attrs) and the study_name token replaced by their digest
ID_TOKEN = "%id%"
DATA_ATTR, CONFIG_ATTR, SEARCHED_ATTR = "data_fingerprint", "fixed_config", "searched_params"
# app config keys that say where or how a job runs, not what it computes: not part of a study's identity
NOT_RESULTS = (
    "hpo_trial",
    "tracking",
    "run_name",
    "trainer.num_workers",
    "trainer.resume",
    "trainer.resume_dir",
    "data.cache_dir",
    "data.root",
    "data.tile_store",
    "data.tile_store_max_gb",
    "data.tile_store_device",
)


def distribution_from_override(override: Override) -> BaseDistribution | str:
    """A sweep override -> an Optuna distribution; a plain override -> its value string."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if value.shuffle:
            return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        # range(a, b, step=s) excludes b, as in Python and Hydra's grid: high = the last value taken
        start, stop, step = int(value.start), int(value.stop), int(value.step)
        return IntDistribution(start, start + step * ((stop - start - 1) // step), step=step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise UserError(f"{override.input_line}: not a sweep the Optuna sweeper understands")


def search_space(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """``key=value`` strings -> (distributions, fixed overrides)."""
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        value = distribution_from_override(override)
        if isinstance(value, BaseDistribution):
            distributions[key] = value
            fixed.pop(key, None)
        else:
            fixed[key] = value
            distributions.pop(key, None)
    return distributions, fixed


def grid_choices(name: str, d: BaseDistribution) -> list:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, (IntDistribution, FloatDistribution)) and d.step is not None and not d.log:
        n = round((d.high - d.low) / d.step) + 1
        return [d.low + i * d.step for i in range(n)]
    raise UserError(f"hydra.sweeper.params.{name}: the grid sampler needs choice(...) or range(...), not {d}")


def _storage(url: str | None, retry_s: float = hpo.STORAGE_RETRY_S, attempts: int = 5):
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
                f"hydra.sweeper.storage={tracking.redact(url)}: cannot open the Optuna storage "
                f"({tracking.redact(_first_line(e))}); check the URL, that the database "
                "server runs and the credentials (PGPASSWORD or ~/.pgpass)"
            ) from None


_first_line = first_line


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(key: str, roots) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def _param_root(key: str) -> str:
    """``+optimizer.lr`` / ``optimizer@x`` -> the config path it sets."""
    return key.lstrip("+~").split("@", 1)[0]


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def identity_differences(was: dict, now: dict) -> list[str]:
    """What differs between a study's recorded identity and this sweep's, in words."""
    parts = []
    if was.get(DATA_ATTR) != now[DATA_ATTR]:
        parts.append(f"on other data (fingerprint {str(was.get(DATA_ATTR))[:8]} -> {now[DATA_ATTR][:8]})")
    old, new = was.get(CONFIG_ATTR) or {}, now[CONFIG_ATTR]
    old_searched, new_searched = set(was.get(SEARCHED_ATTR) or []), set(now[SEARCHED_ATTR])
    changes = [
        f"{key}={_show(old[key])}, now {_show(new[key])}" for key in sorted(set(old) & set(new)) if old[key] != new[key]
    ]
    changes += [
        f"{root} fixed, now searched"
        for root in sorted(new_searched - old_searched)
        if any(_under(key, [root]) for key in old)
    ]
    changes += [
        f"{root} searched, now fixed"
        for root in sorted(old_searched - new_searched)
        if any(_under(key, [root]) for key in new)
    ]
    if changes:
        shown = changes[:4] + ([f"{len(changes) - 4} more keys"] if len(changes) > 4 else [])
        parts.append("with " + " and ".join(shown))
    return parts


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


class OptunaSweeperImpl:
    def __init__(
        self,
        sampler,
        direction,
        storage,
        study_name,
        n_trials,
        n_jobs,
        max_failure_rate,
        params,
        custom_search_space,
        pruner,
        heartbeat_s,
        grace_s,
        storage_retry_s: float = hpo.STORAGE_RETRY_S,
    ) -> None:
        self.sampler_cfg = sampler
        self.direction = direction
        self.storage_url = None if storage in (None, "") else str(storage)
        self.study_name = study_name
        self.n_trials = int(n_trials)
        self.n_jobs = max(1, int(n_jobs))
        self.max_failure_rate = float(max_failure_rate)
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise UserError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: must be within [0, 1]")
        self.params = params
        self.custom_search_space = get_method(custom_search_space) if custom_search_space else None
        self.pruner_cfg = pruner
        self.heartbeat_s, self.grace_s = int(heartbeat_s), int(grace_s)
        self.storage_retry_s = float(storage_retry_s)
        if self.storage_retry_s < 0:
            raise UserError(f"hydra.sweeper.storage_retry_s={storage_retry_s}: must be >= 0 (seconds)")
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.in_process = type(self.launcher).__name__ == "BasicLauncher"
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    # ---------------------------------------------------------------- setup of the study
    def _direction(self) -> str:
        objective = str(self.config.objective)
        implied = objective_direction(objective)
        if self.direction not in (None, "", implied):
            raise UserError(
                f"hydra.sweeper.direction={self.direction} contradicts objective={objective} "
                f"({implied}); drop the direction or change the objective"
            )
        return implied

    def _sampler(self, distributions):
        """Hydra instantiated the sampler; the grid one is partial: it gets the grid from the
        search space here."""
        sampler = self.sampler_cfg
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = sampler.keywords.get("search_space") or {k: grid_choices(k, d) for k, d in distributions.items()}
            size = math.prod(len(v) for v in grid.values())
            if size < self.n_trials:
                log.info("grid of %d points: n_trials %d -> %d", size, self.n_trials, size)
                self.n_trials = size
            return sampler(**{**sampler.keywords, "search_space": grid})
        return sampler

    def _identity(self, distributions, fixed: dict[str, str]) -> dict:
        """What the study's trials have in common: the data's fingerprint and the fixed config (the
        app config composed with the fixed overrides, without the searched params, Hydra's node,
        per-job keys and keys that do not change results)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, [f"{k}={v}" for k, v in fixed.items()])
        searched = sorted({_param_root(k) for k in distributions})
        app = {
            key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            for key in cfg
            if key != "hydra"
        }
        config = {k: v for k, v in _flatten(app).items() if not _under(k, NOT_RESULTS + tuple(searched))}
        fingerprint = "searched" if any(_under(k, ["data"]) for k in searched) else data.data_fingerprint(cfg.data)
        return {SEARCHED_ATTR: searched, CONFIG_ATTR: config, DATA_ATTR: fingerprint}

    def _study_name(self, identity: dict) -> str | None:
        if not self.study_name or ID_TOKEN not in str(self.study_name):
            return self.study_name
        digest = hashlib.sha256(
            json.dumps(
                {"data": identity[DATA_ATTR], "config": identity[CONFIG_ATTR]}, sort_keys=True, default=str
            ).encode()
        ).hexdigest()[:8]
        return str(self.study_name).replace(ID_TOKEN, digest)

    def _recorded_identity(self, study, wait_s: float = 30) -> dict | None:
        """The identity the study's creator recorded; a sweep that created it a moment ago is
        recording it now: wait for it. None: made before studies recorded one."""
        deadline = time.monotonic() + wait_s
        while True:
            attrs = study.user_attrs
            if DATA_ATTR in attrs:
                return attrs
            if time.monotonic() > deadline or self.storage_url is None or study.get_trials(deepcopy=False):
                return None
            time.sleep(0.2)

    def _check_identity(self, study, identity: dict) -> None:
        """Record the identity of a new study; refuse to add trials of other data or settings to an old one."""
        if not self.created:
            was = self._recorded_identity(study)
            if was is not None:
                differences = identity_differences(was, identity)
                if differences:
                    raise UserError(
                        tracking.redact(
                            f"hydra.sweeper.study_name={study.study_name}: the study was made "
                            f"{' / '.join(differences)}; use another study_name"
                        )
                    )
                return
            log.warning(
                "study '%s' was made before studies recorded their data and fixed config: recording "
                "this sweep's (data fingerprint %s)",
                study.study_name,
                identity[DATA_ATTR][:8],
            )
        for key in (SEARCHED_ATTR, CONFIG_ATTR, DATA_ATTR):  # the data last: a joining sweep waits for it
            study.set_user_attr(key, identity[key])

    def _mention_unnamed_predecessor(self, study) -> None:
        """A study of the same preset named before the %id% token: say that it is not continued."""
        if not self.created or self.storage_url is None or ID_TOKEN not in str(self.study_name):
            return
        old = str(self.study_name).replace("-" + ID_TOKEN, "").replace(ID_TOKEN, "")
        try:
            self.storage.get_study_id_from_name(old)
        except KeyError:
            return
        log.warning(
            "study '%s' (named before studies were named by their data and settings) is not continued: "
            "this sweep starts '%s'; hydra.sweeper.study_name=%s continues the old one if it was made on "
            "the same data and settings",
            old,
            study.study_name,
            old,
        )

    def _study(self, distributions, fixed: dict[str, str]) -> optuna.Study:
        if self.pruner_cfg and self.storage_url is None and not self.in_process:
            raise UserError(
                f"hydra.sweeper.pruner needs the jobs to reach the study, but the study is in memory and "
                f"the launcher ({type(self.launcher).__name__}) runs jobs in other processes; set "
                "hydra.sweeper.storage (e.g. sqlite:///optuna.db) or drop the pruner"
            )
        identity = self._identity(distributions, fixed)
        self.storage = _storage(self.storage_url, self.storage_retry_s)
        pruner = self.pruner_cfg or optuna.pruners.NopPruner()  # instantiated by Hydra
        common = dict(
            study_name=self._study_name(identity),
            storage=self.storage,
            sampler=self._sampler(distributions),
            pruner=pruner,
        )
        try:  # exactly one of several sweeps starting together creates the study
            study = optuna.create_study(direction=self._direction(), **common)
            self.created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(**common)
            self.created = False
            # a seeded sampler would draw the same points as the sweep that created the study (or,
            # on resume, as its own first run): reseed it from the system's entropy
            study.sampler.reseed_rng()
        existing = study.direction.name.lower()
        if existing != self._direction():
            raise UserError(
                f"study '{study.study_name}' in {tracking.redact(self.storage_url)} was made to "
                f"{existing}, but objective={self.config.objective} needs {self._direction()}; "
                "use another hydra.sweeper.study_name"
            )
        self._check_identity(study, identity)
        self._mention_unnamed_predecessor(study)
        if self.storage_url is None:
            hpo.register_in_memory(study)
        return study

    # ---------------------------------------------------------------- trial bookkeeping
    def _trials(self, study):
        return study.get_trials(deepcopy=False)

    def _counts(self, study) -> Counter:
        return Counter(t.state.name for t in self._trials(study) if not t.system_attrs.get(RELEASED))

    def _release(self, study, trial_id: int, why: str) -> None:
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
        self._release(study, trial_id, why)
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
            tracking.mark_trial_runs_killed(self.parent_id, frozen.number, why)
        except Exception as e:  # the tracking store is what stopped it
            log.warning(
                "trial %d: could not mark its MLflow run: %s",
                frozen.number,
                tracking.redact(tracking.failure_reason(e)),
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
            self._release(study, trial._trial_id, "surplus")
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
        return isinstance(ret._return_value, hpo.StorageUnavailable)

    def _tell(self, study, trial, ret) -> str:
        if self._infrastructure_stop(ret):
            self._interrupted(study, trial._trial_id, "interrupted by the infrastructure")
            return "INTERRUPTED"
        if ret.status != JobStatus.COMPLETED:
            reason = tracking.failure_reason(ret._return_value) if ret._return_value else "job failed"
            log.warning("trial %d failed: %s", trial.number, tracking.redact(reason))
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

    # ---------------------------------------------------------------- the sweep
    def sweep(self, arguments: list[str]) -> None:
        from resnet_sweep.train import exit_with

        try:
            self._sweep(arguments)
        except UserError as e:
            exit_with(str(e))
        except hpo.StorageUnavailable as e:
            down = f"unreachable for {e.seconds:g} s ({e.reason})" if hasattr(e, "reason") else str(e)
            exit_with(
                f"hydra.sweeper.storage={tracking.redact(self.storage_url)}: the Optuna storage is {down}; "
                "the study and its finished trials are kept: once the database is back, re-run the same "
                f"command to resume (hydra.sweeper.storage_retry_s={self.storage_retry_s:g} is how long "
                "a sweep waits)"
            )

    def _sweep(self, arguments: list[str]) -> None:
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        distributions, fixed = search_space(params + list(arguments))
        if not distributions and not self.custom_search_space:
            raise UserError(
                "the Optuna sweeper has nothing to search: give hydra.sweeper.params "
                "(e.g. hpo=lr_search) or a sweep such as 'optimizer.lr=tag(log, interval(1e-6, 1e-2))'"
            )
        study = self._study(distributions, fixed)
        self.parent_id = tracking.open_study_parent(self.config, study, self.storage_url, self.created)
        log.info(
            "Optuna study '%s' in %s: %s %s, %d trials, sampler %s, pruner %s",
            study.study_name,
            tracking.redact(self.storage_url or "memory"),
            self._direction(),
            self.config.objective,
            self.n_trials,
            type(study.sampler).__name__,
            type(study.pruner).__name__,
        )
        log.info("search space: %s", {k: repr(d) for k, d in distributions.items()})
        heartbeat = _Heartbeat(self.storage, self.heartbeat_s).start() if self.storage_url else None
        told: Counter = Counter()
        interrupted_batches = 0  # batches in a row whose every job the infrastructure stopped
        try:
            self._release_interrupted(study)
            while True:
                counts = self._counts(study)
                finished = sum(counts[s.name] for s in FINISHED)
                running_elsewhere = counts["RUNNING"]
                to_go = self.n_trials - finished - running_elsewhere
                if to_go <= 0:
                    if running_elsewhere and finished < self.n_trials:
                        time.sleep(min(self.heartbeat_s, 10))  # parallel sweeps finishing the last trials
                        self._release_interrupted(study)
                        continue
                    break
                trials = [t for t in (self._take(study, distributions) for _ in range(min(self.n_jobs, to_go))) if t]
                if not trials:
                    continue
                if heartbeat:
                    heartbeat.trial_ids.update(t._trial_id for t in trials)
                returns = self.launcher.launch(
                    [self._overrides(t, fixed, study) for t in trials], initial_job_idx=self.job_idx
                )
                self.job_idx += len(returns)
                states = []
                for trial, ret in zip(trials, returns):
                    states.append(self._tell(study, trial, ret))
                    if heartbeat:
                        heartbeat.trial_ids.discard(trial._trial_id)
                told.update(states)
                interrupted_batches = interrupted_batches + 1 if set(states) == {"INTERRUPTED"} else 0
                if interrupted_batches >= 2:
                    raise UserError(
                        f"{told['INTERRUPTED']} trials were interrupted by the infrastructure (a store or database "
                        "unreachable, a full disk: see the jobs' logs), the last 2 batches entirely; the study is "
                        "kept: once that is fixed, re-run the same command to resume it"
                    )
                done = sum(told[s.name] for s in FINISHED)
                if done and told["FAIL"] / done > self.max_failure_rate:
                    raise UserError(
                        f"{told['FAIL']} of {done} trials failed, more than hydra.sweeper.max_failure_rate="
                        f"{self.max_failure_rate}; see the failed runs' failure_reason in MLflow"
                    )
            self._results(study, distributions, told)
        except BaseException as e:
            try:
                tracking.close_study_parent(
                    self.parent_id,
                    study,
                    None,
                    failed=tracking.failure_reason(e),
                    killed=isinstance(e, KeyboardInterrupt),
                )
            except Exception as close_error:  # the tracking store is down too: the reason goes to the log
                log.warning(
                    "could not mark the study's MLflow run %s failed: %s",
                    self.parent_id,
                    tracking.redact(tracking.failure_reason(close_error)),
                )
            raise
        finally:
            if heartbeat:
                heartbeat.stop()

    def _results(self, study, distributions, told: Counter) -> None:
        counts = self._counts(study)
        completed = [t for t in self._trials(study) if t.state == TrialState.COMPLETE]
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": study.study_name,
            "storage": tracking.redact(self.storage_url or "memory"),
            "objective": str(self.config.objective),
            "direction": self._direction(),
            "n_trials": self.n_trials,
            "counts": {s.name: counts[s.name] for s in FINISHED},
            "this_run": dict(told),
        }
        if completed:
            best = study.best_trial
            results.update(best_params=dict(best.params), best_value=best.value, best_trial=best.number)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        path = self.sweep_dir / "optimization_results.yaml"
        path.write_text(yaml.safe_dump(results, sort_keys=False))
        summary = ", ".join(f"{counts[s.name]} {s.name}" for s in FINISHED)
        line = f"study '{study.study_name}': {sum(counts[s.name] for s in FINISHED)} finished trials ({summary})"
        if completed:
            line += f"; best {self.config.objective} = {results['best_value']:.4f} with {results['best_params']}"
        log.info("%s", line)
        print(line, flush=True)
        tracking.close_study_parent(self.parent_id, study, results, distributions=distributions, results_file=path)
