"""Shared fixtures: a tiny ImageFolder tree, a CLI runner, MLflow readers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "train.py"

# Fast settings: tiny images, resnet18 without pretrained weights, 1 epoch, no workers.
FAST = [
    "backbone.weights=none",
    "backbone.crop_size=32",
    "trainer.max_epochs=1",
    "trainer.num_workers=0",
    "trainer.batch_size=8",
]


def pytest_configure(config):
    """One torch (OpenMP) thread per test process, and per process a test starts, unless set: xdist
    runs a test per core, and two processes each running as many OpenMP threads as there are cores
    spin for one another (measured on 2 cores: 53 in-process tests of five modules took 80-89 s and
    138-149 CPU-s with torch's default, 54-56 s and 81-82 CPU-s with one thread). Jobs that set their
    threads (``cores.share``: launchers, ``cpus_per_task``) still do."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """End-to-end tests first, so that the parallel workers end together on short in-process ones.
    Among them the SLURM cluster's (the longest, mostly waiting on the scheduler) alternate with the
    others (mostly computing), so that the first tests the workers take do not all wait at once."""
    e2e = [item for item in items if item.get_closest_marker("e2e") is not None]
    slurm = [item for item in e2e if "test_slurm.py" in item.nodeid]
    slurm.sort(key=lambda item: not ("time_limit" in item.nodeid or "requeued" in item.nodeid))  # the longest
    other = [item for item in e2e if "test_slurm.py" not in item.nodeid]
    mixed = [item for pair in zip(slurm, other) for item in pair]
    mixed += slurm[len(other) :] + other[len(slurm) :]
    items[:] = mixed + [item for item in items if item.get_closest_marker("e2e") is None]


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core and one more. End-to-end tests spend much of their time waiting
    (on a scheduler, a server restart, a signal's delivery), and the extra worker's tests use the
    cores meanwhile."""
    return (os.cpu_count() or 1) + 1


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Demo data and stats caches go to one temp folder for the whole session."""
    cache = os.environ.get("RESNET_SWEEP_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["RESNET_SWEEP_CACHE"] = cache
    yield cache


def fresh_store(cwd: Path, name: str = "mlflow.db") -> None:
    """Put an empty, migrated MLflow store at ``cwd/name`` (by default the default store,
    ``sqlite:///mlflow.db``) unless one is there: what the first run's MLflow would create, copied
    from one it created once per session (creating it runs MLflow's ~50 schema migrations, about 2 s
    of CPU per test)."""
    import shutil

    from filelock import FileLock

    target = Path(cwd) / name
    if target.exists():
        return
    template = Path(os.environ["RESNET_SWEEP_CACHE"]) / "empty-mlflow.db"
    with FileLock(str(template) + ".lock"):  # one xdist worker makes it, the others wait
        if not template.exists():
            import mlflow

            partial = template.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{partial}").search_experiments()
            _forget_mlflow_stores()
            partial.rename(template)
    shutil.copyfile(template, target)


def make_tree(root: Path, per_class=(6, 3, 3), size=40, classes=("a_class", "b_class"), seed=0) -> Path:
    """root/{train,valid,test}/{a_class,b_class}/*.png: reddish vs bluish noise tiles (a third class: greenish)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "valid", "test"), per_class):
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                img[..., (0, 2, 1)[label % 3]] += 120
                Image.fromarray(img).save(folder / f"img{i}.png")
    return root


@pytest.fixture
def tiny_tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tiles")


def hydra_conf():
    """Hydra initialised on the app's ``conf/`` (a context manager): ``hydra.compose`` inside it
    composes configs as ``train.py`` does. The one place the tests initialise Hydra."""
    from hydra import initialize_config_dir

    return initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3")


def compose_cfg(*overrides: str, hydra: bool = False):
    """``conf/train.yaml`` composed with ``overrides``, as Hydra composes a job's config
    (``hydra``: with its ``hydra.*`` node)."""
    from hydra import compose

    with hydra_conf():
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def cfg_train(tmp_path, tiny_tree):
    """A fast job's config on the tiny tree, its store and resume state in ``tmp_path``
    (the shared composed config of the tests that call the job directly)."""
    fresh_store(tmp_path)
    return compose_cfg(
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        f"trainer.resume_dir={tmp_path / 'resume'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )


def run_train(cwd: Path, *args: str, check: bool = True, timeout: int = 600, env: dict | None = None):
    """``python train.py ARGS`` as a user runs it, in ``cwd`` (mlflow.db, outputs/ land there)."""
    fresh_store(cwd)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def _fresh_process_state() -> None:
    """What a fresh process starts without: the app's caches, registries, stop flag and locks
    (``registry.PROCESS``), so that ``run_app`` behaves like ``python train.py``."""
    from resnet_sweep.core.registry import PROCESS

    PROCESS.reset()


def _forget_mlflow_stores() -> None:
    """MLflow caches a store per URI: ``sqlite:///mlflow.db`` (relative) would stay the first test's file."""
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service import utils
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    for registry in (TrackingStoreRegistry, ModelRegistryStoreRegistry):
        getter = getattr(registry, "_get_store_with_resolved_uri", None)
        if hasattr(getter, "cache_clear"):
            getter.cache_clear()
    utils._artifact_repos_cache.clear()
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for store in (SqlAlchemyStore, RegistryStore):  # one SQLAlchemy engine per URI, also cached
        engines = getattr(store, "_engine_map", None)
        if isinstance(engines, dict):
            for uri in [u for u in engines if u.startswith("sqlite:///") and not u.startswith("sqlite:////")]:
                engines.pop(uri).dispose()


def run_app(
    cwd: Path,
    *args: str,
    check: bool = True,
    env: dict | None = None,
    script: Path = TRAIN_PY,
    module: str = "",
    store: bool = True,
):
    """``python train.py ARGS`` run in this process (no interpreter start, no torch/MLflow import):
    the same script, arguments, working folder and environment; stdout, stderr and the exit code
    as ``run_train`` returns them. Process-wide state (cwd, argv, environment, signal handlers,
    logging, Hydra's current config, MLflow's cached stores, torch threads, the app's per-process
    caches and atexit handlers) is restored or run after. ``module="resnet_sweep.tools.cli"``: ``python -m``
    that module instead (``resnet-sweep report``). ``store=False``: no ``fresh_store`` in ``cwd``
    first (a test that checks what the run creates); never for ``module``."""
    import atexit
    import io
    import logging
    import runpy
    import signal
    import traceback
    import warnings

    import mlflow
    import torch
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_threads = torch.get_num_threads()
    at_exit = []  # the app's atexit handlers run when "its process" ends, i.e. when this run ends
    register, unregister = atexit.register, atexit.unregister

    def app_register(fn, *a, **kw):
        if str(getattr(fn, "__module__", "")).startswith(("resnet_sweep", "hydra_plugins.resnet_sweep")):
            at_exit.append((fn, a, kw))
            return fn
        return register(fn, *a, **kw)

    def app_unregister(fn):
        at_exit[:] = [h for h in at_exit if h[0] != fn]
        unregister(fn)

    if store and not module:  # the tools (resnet-sweep report, ...) read a store, they do not start one
        fresh_store(cwd)
    _fresh_process_state()
    _forget_mlflow_stores()
    saved_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    code = 0
    try:
        atexit.register, atexit.unregister = app_register, app_unregister
        os.environ.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.chdir(cwd)
        sys.argv = [module or str(script), *args]
        GlobalHydra.instance().clear()
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if module:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the interpreter prints for an uncaught exception
                traceback.print_exc()
                code = 1
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            for fn, a, kw in reversed(at_exit):
                with contextlib.suppress(Exception):
                    fn(*a, **kw)
    finally:
        atexit.register, atexit.unregister = register, unregister
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(saved_uri)
        _forget_mlflow_stores()
        for handler in root.handlers:
            if handler not in saved_handlers:
                with contextlib.suppress(Exception):
                    handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # ConfigStore, plugins and resolvers stay registered, as imports do
        torch.set_num_threads(saved_threads)
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        _fresh_process_state()
    proc = subprocess.CompletedProcess([module or str(script), *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(
            f"{module or script.name} {' '.join(args)} (in-process) exited {code}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


@dataclass
class Runs:
    all: list
    parents: list
    children: list

    def by_name(self, name):
        return [r for r in self.all if r.info.run_name == name]


def mlflow_runs(cwd: Path, experiment: str = "resnet-sweep") -> Runs:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    return Runs(runs, parents, children)


def client_for(cwd: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def server_env(**more: str) -> dict[str, str]:
    """The environment of an ``mlflow server`` / ``mlflow ui`` a test starts: without MLflow's job
    execution (GenAI scorers and the like, which this product does not use), whose three Huey
    consumer processes each import MLflow at every start (about 2 CPU-seconds apiece)."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **more}


def wait_until_healthy(uri: str, proc, log_path: Path, timeout: float = 120) -> None:
    """Until ``uri``/health answers 200 (an ``mlflow server`` starting), or fail with its log."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"mlflow server did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.3)


def assert_interrupted_point_ran_again(trials) -> None:
    """Trial 0 was interrupted: released (FAIL, not counted), and its point ran again in a counted trial."""
    released = [t for t in trials if t.system_attrs.get("resnet_sweep:released")]
    counted = [t for t in trials if not t.system_attrs.get("resnet_sweep:released")]
    assert [(t.number, t.state.name) for t in released] == [(0, "FAIL")]
    assert [t.state.name for t in counted] == ["COMPLETE", "COMPLETE"]
    retry = next(t for t in counted if t.system_attrs.get("failed_trial") == 0)
    assert retry.params == released[0].params, "the interrupted point runs again"
