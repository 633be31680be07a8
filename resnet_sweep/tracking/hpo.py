"""The job's side of an Optuna sweep: report the objective after every epoch, stop when pruned.

The sweeper adds ``+hpo_trial.{number,id,study,report}`` to each job's overrides; the storage and pruner are read from the job's ``hydra.sweeper`` (``JobContext.sweeper``). An
in-memory study is found in this process's registry (in-process launcher only).

A database storage is used through outages of up to ``hydra.sweeper.storage_retry_s`` seconds
(default 120): the report waits and the epoch's value reaches the trial. Past that, the report
raises ``optuna_storage.StorageUnavailable``: the job did not fail, the infrastructure did (``INTERRUPTED``).
"""

from __future__ import annotations

from collections.abc import Callable

from resnet_sweep.core.registry import PROCESS

PRUNED = "pruned"  # what a pruned job returns to the sweeper
# what a job returns when it did not finish for a reason outside the trial itself (tracking store or
# database unreachable, disk full, SIGTERM/SIGINT): its epochs are kept for resume, and the sweeper
# re-runs the trial instead of counting it as failed
INTERRUPTED = "interrupted"

# study name -> optuna.Study, for the in-process launcher
_IN_MEMORY: dict[str, object] = PROCESS.state("hpo.in_memory")


class Pruned(Exception):
    """The pruner stopped this trial."""

    def __init__(self, epoch: int):
        super().__init__(f"pruned by the Optuna pruner at epoch {epoch}")
        self.epoch = epoch


def register_in_memory(study) -> None:
    _IN_MEMORY[study.study_name] = study


def find_study(name: str, storage: str | None):
    """The study ``name``: this process's in-memory one, else loaded from ``storage``; None where
    neither has it (for its plots: a study that cannot be read is no error)."""
    if name in _IN_MEMORY:
        return _IN_MEMORY[name]
    if not storage or storage == "memory":
        return None
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception:
        return None


def reporter(link, sweeper) -> Callable[[int, float], None] | None:
    """``report(epoch, value)`` for the job's trial (``link``: its ``hpo_trial``, ``JobContext.trial``),
    or None outside an Optuna sweep. ``sweeper``: the sweep's ``hydra.sweeper`` (its storage and
    pruner, ``JobContext.sweeper``)."""
    if not link or not link.get("report", True):
        return None
    import optuna
    from hydra.utils import instantiate

    study = _IN_MEMORY.get(str(link.study))
    if study is None:
        from resnet_sweep.tracking.optuna_storage import STORAGE_RETRY_S, open_storage

        pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else optuna.pruners.NopPruner()
        storage = open_storage(str(sweeper.storage), float(sweeper.get("storage_retry_s", STORAGE_RETRY_S)))
        study = optuna.load_study(study_name=str(link.study), storage=storage, pruner=pruner)
    trial = optuna.trial.Trial(study, int(link.id))

    def report(epoch: int, value: float) -> None:  # StorageUnavailable past the retry time
        trial.report(value, step=epoch)
        if trial.should_prune():
            raise Pruned(epoch)

    return report
