"""The Optuna sweeper: ask a batch of trials, launch them as Hydra jobs, tell the results.

- Search space from ``params`` and command-line sweeps, in hydra-optuna-sweeper's syntax:
  ``choice(a, b)`` / ``a,b`` -> categorical, ``range(a, b, step=s)`` -> int (or float) with step,
  ``interval(a, b)`` -> uniform, ``tag(log, interval(a, b))`` -> log-uniform.
- Persistent and resumable: with a ``storage``, the study continues until it holds ``n_trials``
  finished trials (COMPLETE, PRUNED or FAIL). RUNNING trials whose sweep died (same host and its
  process gone, or no heartbeat for ``grace_s``) are marked FAIL as *interrupted* and replaced:
  they do not count. Several sweep processes on one study share it; trial numbers past
  ``n_trials`` taken in a race are released the same way.
- NaN-safe: a job that returns NaN/inf or raises is a FAIL trial and the study goes on, up to
  ``max_failure_rate``.
- Pruning: jobs report the objective per epoch to their trial (resnet_sweep.hpo) and stop when the
  pruner says so; the sweeper tells PRUNED.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import threading
import time
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
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from resnet_sweep import hpo, tracking
from resnet_sweep.engine import direction as objective_direction
from resnet_sweep.errors import UserError

log = logging.getLogger(__name__)

OWNER = "resnet_sweep:owner"
RELEASED = "resnet_sweep:released"  # interrupted or surplus: FAIL that does not count
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


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
        n = int(round((d.high - d.low) / d.step)) + 1
        return [d.low + i * d.step for i in range(n)]
    raise UserError(f"hydra.sweeper.params.{name}: the grid sampler needs choice(...) or range(...), not {d}")


def _storage(url: str | None, attempts: int = 5):
    """The study's storage. Several sweeps opening a new database at the same moment race to
    create its tables: the losers retry. An unreachable database is one line naming the key."""
    if url is None:
        return optuna.storages.InMemoryStorage()
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 15}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except Exception as e:
            from sqlalchemy.exc import IntegrityError, ProgrammingError

            if isinstance(e, (IntegrityError, ProgrammingError)) and attempt + 1 < attempts:
                time.sleep(1 + attempt)  # another sweep is creating the tables
                continue
            raise UserError(f"hydra.sweeper.storage={tracking.redact(url)}: cannot open the Optuna storage "
                            f"({tracking.redact(_first_line(e))}); check the URL, that the database "
                            "server runs and the credentials (PGPASSWORD or ~/.pgpass)") from None


def _first_line(e: Exception) -> str:
    e = getattr(e, "orig", None) or e  # SQLAlchemy's wrapper -> the driver's own message
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


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
    def __init__(self, sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                 params, custom_search_space, pruner, heartbeat_s, grace_s) -> None:
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
            raise UserError(f"hydra.sweeper.direction={self.direction} contradicts objective={objective} "
                            f"({implied}); drop the direction or change the objective")
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

    def _study(self, distributions) -> optuna.Study:
        if self.pruner_cfg and self.storage_url is None and not self.in_process:
            raise UserError(
                f"hydra.sweeper.pruner needs the jobs to reach the study, but the study is in memory and "
                f"the launcher ({type(self.launcher).__name__}) runs jobs in other processes; set "
                "hydra.sweeper.storage (e.g. sqlite:///optuna.db) or drop the pruner"
            )
        self.storage = _storage(self.storage_url)
        pruner = self.pruner_cfg or optuna.pruners.NopPruner()  # instantiated by Hydra
        common = dict(study_name=self.study_name, storage=self.storage, sampler=self._sampler(distributions),
                      pruner=pruner)
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
            raise UserError(f"study '{study.study_name}' in {tracking.redact(self.storage_url)} was made to "
                            f"{existing}, but objective={self.config.objective} needs {self._direction()}; "
                            "use another hydra.sweeper.study_name")
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
            dead = owner.get("host") == host and not _alive(int(owner.get("pid", -1)))
            if dead or now - last > self.grace_s:
                try:
                    self._release(study, t._trial_id, "interrupted")
                except Exception:  # another sweep process released it first
                    continue
                n += 1
                log.warning("trial %d was left RUNNING by an interrupted sweep: marked FAIL, replaced", t.number)
                tracking.mark_trial_runs_killed(self.parent_id, t.number, "sweep interrupted")
        return n

    def _take(self, study, distributions) -> optuna.Trial | None:
        """Ask one trial; release it if a parallel sweep filled the study meanwhile."""
        trial = study.ask(fixed_distributions=distributions)
        self.storage.set_trial_system_attr(trial._trial_id, OWNER, {
            "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()})
        counted = [t for t in self._trials(study)
                   if not t.system_attrs.get(RELEASED) and t.number <= trial.number]
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
        overrides += [f"+hpo_trial.number={trial.number}", f"+hpo_trial.id={trial._trial_id}",
                      f"+hpo_trial.study='{study.study_name}'", f"+hpo_trial.report={report}"]
        return overrides

    @staticmethod
    def _safe_tell(study, trial, *args, **kwargs) -> None:
        try:
            study.tell(trial, *args, **kwargs)
        except RuntimeError as e:  # GridSampler calls study.stop() once the grid is exhausted
            if "Study.stop" not in str(e):
                raise

    def _tell(self, study, trial, ret) -> str:
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
        try:
            self._sweep(arguments)
        except UserError as e:
            from resnet_sweep.train import exit_with

            exit_with(str(e))

    def _sweep(self, arguments: list[str]) -> None:
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        distributions, fixed = search_space(params + list(arguments))
        if not distributions and not self.custom_search_space:
            raise UserError("the Optuna sweeper has nothing to search: give hydra.sweeper.params "
                            "(e.g. hpo=lr_search) or a sweep such as 'optimizer.lr=tag(log, interval(1e-6, 1e-2))'")
        study = self._study(distributions)
        self.parent_id = tracking.open_study_parent(self.config, study, self.storage_url, self.created)
        log.info("Optuna study '%s' in %s: %s %s, %d trials, sampler %s, pruner %s", study.study_name,
                 tracking.redact(self.storage_url or "memory"), self._direction(), self.config.objective,
                 self.n_trials, type(study.sampler).__name__, type(study.pruner).__name__)
        log.info("search space: %s", {k: repr(d) for k, d in distributions.items()})
        self._release_interrupted(study)
        heartbeat = _Heartbeat(self.storage, self.heartbeat_s).start() if self.storage_url else None
        told: Counter = Counter()
        try:
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
                returns = self.launcher.launch([self._overrides(t, fixed, study) for t in trials],
                                               initial_job_idx=self.job_idx)
                self.job_idx += len(returns)
                for trial, ret in zip(trials, returns):
                    told[self._tell(study, trial, ret)] += 1
                    if heartbeat:
                        heartbeat.trial_ids.discard(trial._trial_id)
                done = sum(told.values())
                if told["FAIL"] / done > self.max_failure_rate:
                    raise UserError(
                        f"{told['FAIL']} of {done} trials failed, more than hydra.sweeper.max_failure_rate="
                        f"{self.max_failure_rate}; see the failed runs' failure_reason in MLflow")
        except BaseException as e:
            tracking.close_study_parent(self.parent_id, study, None, failed=tracking.failure_reason(e))
            raise
        finally:
            if heartbeat:
                heartbeat.stop()
        self._results(study, distributions, told)

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
        tracking.close_study_parent(self.parent_id, study, results, distributions=distributions,
                                    results_file=path)
