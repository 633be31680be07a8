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
- Pruning: jobs report the objective per epoch to their trial (resnet_sweep.tracking.hpo) and stop when the
  pruner says so; the sweeper tells PRUNED.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.plugins import Plugins
from hydra.utils import get_method
from omegaconf import DictConfig
from optuna.trial import TrialState

from resnet_sweep.config.objective import direction as objective_direction
from resnet_sweep.core.errors import UserError, exit_with, first_line
from resnet_sweep.core.redaction import redact
from resnet_sweep.tracking import hpo
from resnet_sweep.tracking.optuna_storage import STORAGE_RETRY_S, StorageUnavailable, open_study_storage

from . import _study_runs
from ._space import grid_choices, search_space
from ._study_identity import StudyIdentity
from ._trials import FINISHED, TrialBookkeeping, _Heartbeat

log = logging.getLogger(__name__)


class OptunaSweeperImpl(StudyIdentity, TrialBookkeeping):
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
        storage_retry_s: float = STORAGE_RETRY_S,
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
        self.in_process = isinstance(self.launcher, BasicLauncher)  # the basic launcher or ours (grouped)
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

    def _study(self, distributions, fixed: dict[str, str]) -> optuna.Study:
        if self.pruner_cfg and self.storage_url is None and not self.in_process:
            raise UserError(
                f"hydra.sweeper.pruner needs the jobs to reach the study, but the study is in memory and "
                f"the launcher ({type(self.launcher).__name__}) runs jobs in other processes; set "
                "hydra.sweeper.storage (e.g. sqlite:///optuna.db) or drop the pruner"
            )
        identity = self._identity(distributions, fixed)
        self.storage = open_study_storage(self.storage_url, self.storage_retry_s)
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
                f"study '{study.study_name}' in {redact(self.storage_url)} was made to "
                f"{existing}, but objective={self.config.objective} needs {self._direction()}; "
                "use another hydra.sweeper.study_name"
            )
        self._check_identity(study, identity)
        self._mention_unnamed_predecessor(study)
        if self.storage_url is None:
            hpo.register_in_memory(study)
        return study

    # ---------------------------------------------------------------- the sweep
    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except UserError as e:
            exit_with(str(e))
        except StorageUnavailable as e:
            down = f"unreachable for {e.seconds:g} s ({e.reason})" if hasattr(e, "reason") else str(e)
            exit_with(
                f"hydra.sweeper.storage={redact(self.storage_url)}: the Optuna storage is {down}; "
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
        self.parent_id = _study_runs.open_study_parent(self.config, study, self.storage_url, self.created)
        _study_runs.log_search_space(self.parent_id, distributions)
        log.info(
            "Optuna study '%s' in %s: %s %s, %d trials, sampler %s, pruner %s",
            study.study_name,
            redact(self.storage_url or "memory"),
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
                _study_runs.close_study_parent(
                    self.parent_id,
                    study,
                    None,
                    failed=first_line(e),
                    killed=isinstance(e, KeyboardInterrupt),
                )
            except Exception as close_error:  # the tracking store is down too: the reason goes to the log
                log.warning(
                    "could not mark the study's MLflow run %s failed: %s",
                    self.parent_id,
                    redact(first_line(close_error)),
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
            "storage": redact(self.storage_url or "memory"),
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
        _study_runs.close_study_parent(self.parent_id, study, results, distributions=distributions, results_file=path)
