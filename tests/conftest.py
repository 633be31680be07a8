"""Shared fixtures: a tiny ImageFolder tree, a CLI runner, MLflow readers."""

from __future__ import annotations

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


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Demo data and stats caches go to one temp folder for the whole session."""
    cache = os.environ.get("RESNET_SWEEP_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["RESNET_SWEEP_CACHE"] = cache
    yield cache


def make_tree(root: Path, per_class=(6, 3, 3), size=40, classes=("a_class", "b_class"), seed=0) -> Path:
    """root/{train,valid,test}/{a_class,b_class}/*.png: reddish vs bluish noise tiles."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "valid", "test"), per_class):
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                img[..., 0 if label == 0 else 2] += 120
                Image.fromarray(img).save(folder / f"img{i}.png")
    return root


@pytest.fixture
def tiny_tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tiles")


def run_train(cwd: Path, *args: str, check: bool = True, timeout: int = 600, env: dict | None = None):
    """``python train.py ARGS`` as a user runs it, in ``cwd`` (mlflow.db, outputs/ land there)."""
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
