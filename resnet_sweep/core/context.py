"""What a job takes from its surroundings, built once where Hydra calls it (``job.job_context``,
from root ``train.py``) and passed in: nothing below the job reads Hydra's global config or the
environment for it. The default is a single run outside Hydra."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnet_sweep.core.registry import PROCESS, Registries

PARENT_FILE = "mlflow_parent_run_id"  # in the sweep's folder: its MLflow parent run, for its jobs and for people


@dataclass(frozen=True)
class JobContext:
    """One job's surroundings.

    ``multirun``: a job of a ``-m`` sweep (else a single run). ``output_dir``: the job's own folder
    (Hydra's output folder: its log, its ``job_status.json``). ``sweep_dir``: the sweep's folder.
    ``overrides``, ``choices``: the job's command-line overrides and the option chosen in each
    config group. ``parent_run_id``: the sweep's MLflow parent run (read from the sweep folder's
    ``mlflow_parent_run_id``, which works across processes and machines). ``hydra``: the job's
    ``hydra.*`` node, for what reads the launcher (threads, GPU slots) or the sweeper (Optuna's
    storage and pruner). ``share``: the sweep's shared data folder. ``trial``: the Optuna trial
    (``hpo_trial``). ``process``: what the process keeps between jobs (caches, the stop flag)."""

    multirun: bool = False
    output_dir: Path | None = None
    sweep_dir: Path | None = None
    overrides: tuple[str, ...] = ()
    choices: Mapping[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    hydra: Any = None
    share: Path | None = None
    trial: Any = None
    process: Registries = PROCESS

    @property
    def launcher(self) -> Any:
        """The sweep's launcher config (``hydra.launcher``), or None outside Hydra."""
        return self.hydra.get("launcher") if self.hydra is not None else None

    @property
    def sweeper(self) -> Any:
        """The sweep's sweeper config (``hydra.sweeper``), or None outside Hydra."""
        return self.hydra.get("sweeper") if self.hydra is not None else None


def read_parent(sweep_dir: Path | None) -> str | None:
    """The MLflow parent run of the sweep in ``sweep_dir`` (``tracking.runs.set_parent`` wrote it), or None."""
    if sweep_dir is None:
        return None
    try:
        return (Path(sweep_dir) / PARENT_FILE).read_text().strip() or None
    except OSError:
        return None
