"""What a job takes from its surroundings: the process's state in one object with a ``reset()``
(the tests' fresh process), and the job's context built once where Hydra calls the job."""

from __future__ import annotations

import importlib
import pkgutil

import resnet_sweep
from resnet_sweep.core.registry import PROCESS


def _import_all() -> None:
    for info in pkgutil.walk_packages(resnet_sweep.__path__, "resnet_sweep."):
        importlib.import_module(info.name)


def test_the_process_state_is_one_object_that_resets():
    _import_all()
    from resnet_sweep.core import faults, sealed
    from resnet_sweep.data import loading, tiles
    from resnet_sweep.tracking import hpo, optuna_storage, sweep_dir

    assert {
        "faults.stop",
        "sealed.verified",
        "tiles.needed",
        "hpo.in_memory",
        "optuna_storage.outages",
        "loading.share",
        "loading.trees",
        "sweep_dir.locks",
        "devices.slots",
    } <= set(PROCESS.names())
    faults._stop.update(signal="SIGTERM", fault="disk full")
    sealed._verified["x"] = ((), {})
    tiles._needed["x"] = 1
    hpo._IN_MEMORY["study"] = object()
    optuna_storage.outage_of("sqlite:///x")
    loading._share["folder"] = "/somewhere"
    sweep_dir._HELD_LOCKS.append(_Lock())
    PROCESS.reset()
    assert faults.stop_signal() is None and faults.stop_fault() is None
    assert not sealed._verified and not tiles._needed and not hpo._IN_MEMORY and not optuna_storage._OUTAGES
    assert loading._share == {"folder": None} and not sweep_dir._HELD_LOCKS


class _Lock:
    def release(self, force: bool = False) -> None:
        pass
