"""Structured configs: ``hydra/sweeper=optuna`` and ``hydra/sweeper/sampler=tpe|random|cmaes|grid|qmc``.

The keys are hydra-optuna-sweeper's (sampler, direction, storage, study_name, n_trials, n_jobs,
max_failure_rate, params, custom_search_space) plus ``pruner``, ``heartbeat_s``, ``grace_s`` and
``storage_retry_s``. ``study_name`` may hold ``%id%``: an 8-hex digest of the data (its files'
fingerprint) and the fixed config, so that other data or settings make another study.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConfig:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    multivariate: bool = False


@dataclass
class RandomSamplerConfig:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConfig:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    n_startup_trials: int = 1


@dataclass
class GridSamplerConfig:
    """The grid is built from the search space (choice/range params) when not given."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    search_space: dict[str, Any] | None = None
    seed: int | None = None


@dataclass
class QMCSamplerConfig:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = True


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.resnet_sweep_optuna.optuna_sweeper.OptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
    # minimize | maximize; null: follows the app's `objective` (valid/loss -> minimize, valid/acc -> maximize)
    direction: str | None = None
    storage: str | None = None  # null: in memory; sqlite:///optuna.db, postgresql://...
    study_name: str | None = None  # %id% in it: digest of the data and the fixed config (hpo= presets)
    n_trials: int = 20  # finished trials the study holds in the end (resume included)
    n_jobs: int = 1  # trials per batch handed to the launcher
    max_failure_rate: float = 0.0  # abort when FAIL / finished exceeds this (1.0: never)
    params: dict[str, str] | None = None
    custom_search_space: str | None = None  # dotted path of fn(cfg, trial) adding suggest_* calls
    pruner: Any = None  # an instantiable optuna.pruners.* config; null: no pruning
    heartbeat_s: int = 20  # a running trial's heartbeat in a database storage
    grace_s: int = 120  # RUNNING without heartbeat this long: interrupted -> FAIL
    # a database outage: the sweeper and the jobs' per-epoch reports wait this long for the storage,
    # then a job returns interrupted (its trial is re-run) and the sweep stops (re-run to resume)
    storage_retry_s: float = 120.0


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="resnet_sweep")
for name, node in (
    ("tpe", TPESamplerConfig),
    ("random", RandomSamplerConfig),
    ("cmaes", CmaEsSamplerConfig),
    ("grid", GridSamplerConfig),
    ("qmc", QMCSamplerConfig),
):
    cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="resnet_sweep")
