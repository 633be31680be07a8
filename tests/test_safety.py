"""Safe loading, credential redaction, fail-fast checks, parallel jobs on one SQLite store."""

from __future__ import annotations

import collections
import os
import re
import subprocess

import pytest
import torch
from conftest import FAST, client_for, compose_cfg, mlflow_runs, run_app, run_train

from resnet_sweep.core.errors import UserError
from resnet_sweep.training import models

SECRET_URL = "postgresql://user:secret@db.example:5432/studies"


class Payload:
    """Any class outside torch's allow-list: unpickling it would run arbitrary code."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_checkpoints_with_pickled_objects_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(
        {"format": "resnet-sweep/1", "state": collections.OrderedDict(), "evil": Payload()}, tmp_path / "best.pt"
    )
    with pytest.raises(Exception) as excinfo:
        models.load_checkpoint(tmp_path / "best.pt")
    assert "weights_only" in str(excinfo.value) or "Unsupported global" in str(excinfo.value)
    torch.save({"conv1.weight": Payload()}, tmp_path / "weights.pt")
    cfg = compose_cfg(f"backbone.weights={tmp_path / 'weights.pt'}")
    with pytest.raises(UserError, match="not a resnet18 state dict"):
        models.build_classifier(cfg.backbone, cfg.head)
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.e2e
def test_passwords_never_reach_params_tags_artifacts_files_or_console(tmp_path, tiny_tree):
    proc = run_train(
        tmp_path,
        "-m",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        f"+notes.database={SECRET_URL}",
        "optimizer.lr=1e-3,1e-2",
    )
    assert "secret" not in proc.stdout + proc.stderr
    assert re.search(r"user\\?:\*\*\*@db.example", proc.stdout + proc.stderr)  # Hydra's launch lines, masked
    client = client_for(tmp_path)
    runs = mlflow_runs(tmp_path)
    for run in runs.all:
        assert "secret" not in repr(run.data.params) + repr(run.data.tags)
        local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl" / run.info.run_id))
        for root, _, files in os.walk(local):
            for f in files:
                assert b"secret" not in open(os.path.join(root, f), "rb").read(), f
    assert any(
        r.data.params.get("notes.database") == "postgresql://user:***@db.example:5432/studies" for r in runs.children
    )
    for root, _, files in os.walk(tmp_path / "multirun"):
        for f in files:
            assert b"secret" not in open(os.path.join(root, f), "rb").read(), os.path.join(root, f)


def test_an_unreachable_tracking_store_fails_fast_in_one_line_without_the_password(tmp_path):
    proc = run_app(tmp_path, *FAST, "tracking.uri=postgresql://user:secret@127.0.0.1:9/db", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tracking.uri=postgresql://user:***@127.0.0.1:9/db: cannot reach the MLflow store")
    assert "secret" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/*/*/train.log"))  # nothing started


def test_an_unreachable_tracking_server_is_one_line_and_nothing_before_it(tmp_path):
    proc = run_app(tmp_path, *FAST, "tracking.uri=http://127.0.0.1:9", check=False, store=False)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("tracking.uri=http://127.0.0.1:9: cannot reach the MLflow store (")
    )
    assert "Retrying" not in proc.stdout + proc.stderr, "urllib3's retry line, before ours"


def test_a_read_only_working_folder_is_one_line_that_says_so(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        proc = run_app(folder, *FAST, check=False, store=False)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tracking.uri=sqlite:///mlflow.db: cannot write here ({folder}: "), last
    assert "start the server" not in last


def test_an_output_folder_that_is_a_file_fails_fast(tmp_path):
    (tmp_path / "outputs").write_text("a file where the output folder should be")
    proc = run_app(tmp_path, *FAST, "hydra.run.dir=outputs/run", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("hydra.run.dir=outputs/run: not writable")


@pytest.mark.e2e
def test_four_parallel_joblib_jobs_on_one_sqlite_store_lose_nothing(tmp_path, tiny_tree):
    proc = run_train(
        tmp_path,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "trainer.max_epochs=2",
        "optimizer.lr=1e-4,1e-3,1e-2,1e-1",
    )
    assert "4 finished, 0 failed" in proc.stdout
    runs = mlflow_runs(tmp_path)
    assert len(runs.parents) == 1 and len(runs.children) == 4
    client = client_for(tmp_path)
    # every run has every param (none lost to the concurrent writes): the same keys in all four
    keys = [set(r.data.params) for r in runs.children]
    assert all(k == keys[0] for k in keys) and {"optimizer.lr", "backbone.name", "trainer.max_epochs"} <= keys[0]
    for run in runs.children:
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/acc", "valid/loss", "valid/acc"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2]
        assert {"test/acc", "test/loss", "test/auroc", "best_epoch"} <= set(run.data.metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "config.yaml", "plots"}
