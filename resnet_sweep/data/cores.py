"""How many cores a job may use: the cores of this process, shared by the jobs a launcher runs side
by side (torch threads per job)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def available() -> int:
    """The cores this process may run on (a SLURM allocation or taskset included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def share(hydra_cfg) -> None:
    """Jobs that run side by side share this machine's cores (see ``threads_per_job``); ``hydra_cfg``:
    the sweep's ``HydraConfig``."""
    import torch

    threads = threads_per_job(hydra_cfg.launcher, hydra_cfg.sweeper, available())
    if threads:
        torch.set_num_threads(threads)
        log.info(
            "%d torch thread(s) for this job (hydra.launcher: %s)",
            threads,
            str(hydra_cfg.launcher.get("_target_", "?")).rsplit(".", 1)[-1],
        )


def threads_per_job(launcher, sweeper, cores: int) -> int | None:
    """Torch threads for one job, or None to keep torch's default (the job is alone).

    - ``cpus_per_task`` set (submitit: SLURM or local): exactly that many; under SLURM without
      it, the cores of the allocation;
    - joblib: cores / jobs at once, where jobs at once = ``n_jobs`` (-1 = all cores, -2 = all
      but one, as in joblib), capped by the Optuna sweeper's batch (``hydra.sweeper.n_jobs``);
    - submitit_local without ``cpus_per_task``: every job of a batch starts at once, so
      cores / the Optuna sweeper's batch (a grid's size is unknown here: set cpus_per_task).
    """
    target = str(launcher.get("_target_", ""))
    cpus = launcher.get("cpus_per_task")
    if isinstance(cpus, int) and cpus >= 1:
        return cpus
    if target.endswith("SlurmLauncher"):
        return cores
    optuna = str(sweeper.get("_target_", "")).startswith("hydra_plugins.resnet_sweep_optuna")
    batch = sweeper.get("n_jobs") if optuna else None
    batch = batch if isinstance(batch, int) and batch >= 1 else None
    n_jobs = launcher.get("n_jobs")
    if isinstance(n_jobs, int) and n_jobs != 0:  # joblib
        at_once = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
        at_once = min(at_once, batch) if batch else at_once
    elif "submitit" in target:
        at_once = batch or 1
    else:
        return None
    return max(1, cores // at_once) if at_once > 1 else None
