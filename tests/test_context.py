"""What a job takes from its surroundings: the process's state in one object with a ``reset()``
(the tests' fresh process), and the job's context built once where Hydra calls the job."""

from __future__ import annotations

import importlib
import pkgutil

from conftest import compose_cfg, mlflow_runs

import resnet_sweep
from resnet_sweep.core.context import JobContext, read_parent
from resnet_sweep.core.registry import PROCESS


def _import_all() -> None:
    for info in pkgutil.walk_packages(resnet_sweep.__path__, "resnet_sweep."):
        importlib.import_module(info.name)


def test_the_process_state_is_one_object_that_resets():
    _import_all()
    from resnet_sweep.core import faults, sealed
    from resnet_sweep.data import shared_tree, tiles
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
    shared_tree._share["folder"] = "/somewhere"
    sweep_dir._HELD_LOCKS.append(_Lock())
    PROCESS.reset()
    assert faults.stop_signal() is None and faults.stop_fault() is None
    assert not sealed._verified and not tiles._needed and not hpo._IN_MEMORY and not optuna_storage._OUTAGES
    assert shared_tree._share == {"folder": None} and not sweep_dir._HELD_LOCKS


class _Lock:
    def release(self, force: bool = False) -> None:
        pass


def test_a_job_is_called_directly_with_its_context(cfg_train, tmp_path, monkeypatch):
    """``run_job(cfg, ctx)`` as Hydra's ``main`` calls it, without Hydra: a single run."""
    import math
    import signal

    import mlflow

    from resnet_sweep.job import run_job

    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        objective = run_job(cfg_train, JobContext())
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        mlflow.set_tracking_uri(None)
        PROCESS.reset()
    assert math.isfinite(objective)
    runs = mlflow_runs(tmp_path)
    assert len(runs.all) == 1 and not runs.children and not runs.parents
    assert math.isclose(runs.all[0].data.metrics[f"best/{cfg_train.objective}"], objective, rel_tol=1e-5)


def test_a_sweeps_jobs_find_its_parent_run_in_its_folder(tmp_path, monkeypatch):
    """The parent run id travels in the sweep folder's file (across processes and machines), not
    in the environment; the job's context reads it once."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from resnet_sweep.job import job_context
    from resnet_sweep.tracking.runs import set_parent

    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg("hydra.sweep.dir=sweep", hydra=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "0")
    set_parent(cfg, "parent-id")
    assert "RESNET_SWEEP_PARENT_RUN_ID" not in os.environ
    HydraConfig.instance().set_config(cfg)
    try:
        ctx = job_context(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert ctx.multirun and ctx.parent_run_id == "parent-id"
    assert ctx.sweep_dir == tmp_path / "sweep" and ctx.output_dir == tmp_path / "sweep" / "0"
    assert read_parent(None) is None and JobContext().parent_run_id is None
