"""Issue 13: every run is right or visibly not, and work done is never thrown away. Faults are
injected for real: signals to the sweep's process group, a real MLflow server killed and restarted,
a full tmpfs under the artifact store, two sweeps at once on one store."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST,
    REPO,
    TRAIN_PY,
    client_for,
    fresh_store,
    make_tree,
    mlflow_runs,
    run_app,
    server_env,
    wait_until_healthy,
)


def data_args(tree, *more):
    return [*FAST, "data=imagefolder", f"data.root={tree}", *more]


def slow_args(tree, *more):
    """The naive loop on 56-px crops: a few seconds per job, slow enough to act between epochs."""
    return data_args(
        tree,
        "backbone.crop_size=56",
        "trainer.max_epochs=4",
        "trainer.patience=null",
        "trainer.feature_bank=off",
        "optimizer.lr=1e-2",
        *more,
    )


def resume_epoch(cwd: Path) -> int:
    best = -1
    for path in (cwd / ".resnet-sweep" / "resume").glob("*.pt"):
        try:
            best = max(best, int(torch.load(path, weights_only=True).get("epoch") or -1))
        except Exception:  # being replaced right now
            pass
    return best


def start(cwd: Path, *args, env=None) -> subprocess.Popen:
    fresh_store(cwd)
    return subprocess.Popen(
        [sys.executable, str(TRAIN_PY), *args],
        cwd=cwd,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epoch(cwd: Path, proc: subprocess.Popen, epoch: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while resume_epoch(cwd) < epoch:
        assert proc.poll() is None, f"ended before epoch {epoch}:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def history_steps(cwd: Path, run, key="valid/loss", client=None) -> list[int]:
    client = client or client_for(cwd)
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


# ---------------------------------------------------------------------------------------------- 1, 12


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["-m", "data.root={tree}", "optimizer.lr=1e-3,2e-3"],
            "data.root={tree} is set, but data=demo trains on the embedded demo data; add data=imagefolder",
        ),
        (
            ["-m", "data=imagefolder", "data.root={tree}", "optimizer.lr=1e-3,abc"],
            "optimizer.lr=abc: the learning rate must be a number > 0",
        ),
        (["data=imagefolder", "data.root={tree}", "optimizer.momentum=abc"], "optimizer.momentum=abc: "),
        (["data=imagefolder", "data.root={tree}", "optimizer.lr=abc"], "optimizer.lr=abc: the learning rate must be"),
        (
            ["data=imagefolder", "data.root={tree}", "trainer.batch_size=abc"],
            "trainer.batch_size=abc: must be an integer",
        ),
        (["data=imagefolder", "data.root={tree}", "optimizer.momentum=-1"], "optimizer.momentum=-1: Invalid momentum"),
        (["-m", "data=imagefolder", "optimizer.lr=1e-3,1e-2"], "data=imagefolder needs data.root"),
        (
            ["data=imagefolder", "data.root={tree}", "objective=valid/f1"],
            "objective=valid/f1: the sweep objective is a validation metric measured every epoch",
        ),
        (["data=imagefolder", "data.root={tree}", "data.sampler=even"], "data.sampler=even: choose shuffle"),
        (
            ["-m", "data=imagefolder", "data.root={tree}", "loss.class_weight=none,heavy"],
            "loss.class_weight=heavy: choose none, balanced",
        ),
    ],
)
def test_config_mistakes_are_one_line_before_anything_is_created(tmp_path, tiny_tree, args, message):
    work = tmp_path / "work"
    work.mkdir()
    args = [a.format(tree=tiny_tree) for a in args]
    flags, overrides = [a for a in args if a == "-m"], [a for a in args if a != "-m"]
    proc = run_app(work, *flags, *FAST, *overrides, check=False, store=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert message.format(tree=tiny_tree) in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in work.iterdir()) == [], "nothing created: no mlflow.db, no run, no outputs"


# ---------------------------------------------------------------------------------------------- 3


def test_changed_data_is_a_new_job_not_a_reuse_of_the_old_results(tmp_path):
    tree = make_tree(tmp_path / "tiles")
    run_app(tmp_path, *data_args(tree))
    make_tree(tmp_path / "more", per_class=(2, 0, 0), seed=1)
    (tmp_path / "more" / "train" / "a_class" / "img0.png").rename(tree / "train" / "a_class" / "new.png")
    again = run_app(tmp_path, *data_args(tree))
    assert "already finished" not in again.stdout + again.stderr
    runs = mlflow_runs(tmp_path).all
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    same = run_app(tmp_path, *data_args(tree))  # unchanged data: reused
    assert "already finished" in same.stdout + same.stderr


# ---------------------------------------------------------------------------------------------- 5, 10


@pytest.mark.e2e
def test_two_sweeps_at_once_in_a_new_folder_share_the_store_and_say_what_ran_elsewhere(tmp_path):
    tree = make_tree(tmp_path / "tiles", per_class=(24, 6, 6), size=64)
    args = ["-m", *slow_args(tree, "trainer.max_epochs=3"), "optimizer.lr=1e-3,1e-2", "hydra.sweep.dir=multirun/same"]
    first = start(tmp_path, *args)
    second = start(tmp_path, *args)  # same second, same folder, same new mlflow.db: no creation race
    outs = [p.communicate(timeout=600) for p in (first, second)]
    texts = [o + e for o, e in outs]
    assert not any("Online migration" in t or "cannot reach the MLflow store" in t for t in texts), texts
    assert any("skipped (running elsewhere)" in t for t in texts), "the sweeps met on a job"
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir()) == ["same", "same-2"]
    runs = mlflow_runs(tmp_path)
    assert len(runs.parents) == 2
    assert sorted(r.data.params["optimizer.lr"] for r in runs.children) == ["0.001", "0.01"], "each job ran once"
    assert all(r.info.status == "FINISHED" for r in runs.children)
    for proc, text in zip((first, second), texts):
        if "skipped (running elsewhere)" in text:  # it did not finish everything here: it says so
            assert proc.returncode != 0 and "re-run the same command" in text
        else:
            assert proc.returncode == 0
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    models = mlflow.search_logged_models(experiment_ids=[runs.children[0].info.experiment_id], output_format="list")
    assert len(models) <= 1, "at most one sweep logs the best model"
    again = run_app(tmp_path, *args[:-1])  # everything reused: complete, so the best model is logged once
    assert "0 finished, 0 failed, 2 reused" in again.stdout
    models = mlflow.search_logged_models(experiment_ids=[runs.children[0].info.experiment_id], output_format="list")
    assert len(models) == 1


# ---------------------------------------------------------------------------------------------- 6


def test_a_run_that_never_improves_on_epoch_0_is_flagged(tmp_path, tiny_tree):
    proc = run_app(
        tmp_path, "-m", *data_args(tiny_tree, "trainer.max_epochs=2", "objective=valid/acc"), "optimizer.lr=1e-9,1e-2"
    )
    runs = {r.data.params["optimizer.lr"]: r for r in mlflow_runs(tmp_path).children}
    flat = runs["1e-09"]
    assert flat.data.tags["never_improved"] == "true" and flat.data.metrics["best_epoch"] == 0
    assert runs["0.01"].data.tags["never_improved"] == "false"
    assert "never improved on its untrained epoch 0" in proc.stdout + proc.stderr
    assert "1 never improved on epoch 0 (resnet18-linear-sgd-lr1e-09-s0)" in proc.stdout
    parent = mlflow_runs(tmp_path).parents[0]
    assert parent.data.tags["best_run_id"] == runs["0.01"].info.run_id


def test_an_epoch_whose_write_reached_the_store_but_whose_answer_was_lost_is_logged_once(
    tmp_path, tiny_tree, monkeypatch
):
    """A tracking server killed (or timing out) after it stored a write but before it answered: the
    job retries the write, and the epoch's values are still in the run once, not twice."""
    from mlflow.tracking import MlflowClient

    real, lost = MlflowClient.log_batch, []

    def answer_lost_once(client, run_id, metrics=(), **kwargs):
        real(client, run_id, metrics=metrics, **kwargs)
        if any(m.step == 1 for m in metrics) and not lost:
            lost.append(1)
            raise ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end closed connection'))")

    monkeypatch.setattr(MlflowClient, "log_batch", answer_lost_once)
    proc = run_app(tmp_path, *data_args(tiny_tree, "trainer.max_epochs=2"))
    assert lost and "retrying for up to" in proc.stdout + proc.stderr
    (run,) = mlflow_runs(tmp_path).all
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "valid/loss", "valid/acc"):
        assert history_steps(tmp_path, run, key) == [0, 1, 2], key


def test_a_store_down_past_its_retry_time_stops_the_sweep_once_and_the_same_command_finishes_it(
    tmp_path, tiny_tree, monkeypatch
):
    """Not a FAILED run per remaining job: the first job is interrupted, the sweep stops there."""
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch

    def down_from_epoch_1(client, run_id, metrics=(), **kwargs):
        if any(m.step == 1 for m in metrics):
            raise ConnectionError("('Connection aborted.', ConnectionRefusedError(111, 'Connection refused'))")
        return real(client, run_id, metrics=metrics, **kwargs)

    # one job at a time (a group's jobs start together: test_full_disk.test_a_full_disk_stops_a_group_whole)
    args = [
        "-m",
        *data_args(tiny_tree, "trainer.max_epochs=2", "tracking.retry_s=0", "trainer.batch_heads=off"),
        "optimizer.lr=1e-3,1e-2",
    ]
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", down_from_epoch_1)
        proc = run_app(tmp_path, *args, check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"resnet18-linear-sgd-lr1e-03-s0 interrupted: .*Connection refused.*; its finished epochs are saved: "
        r"re-run the same command to resume",
        last,
    ), last
    assert len(list((tmp_path / "multirun").rglob(".hydra"))) == 1, "no second job started"
    runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs.children] == ["KILLED"] and runs.parents[0].info.status == "KILLED"

    run_app(tmp_path, *args)
    runs = mlflow_runs(tmp_path)
    assert len(runs.children) == 2 and all(r.info.status == "FINISHED" for r in runs.children)
    assert all(history_steps(tmp_path, r) == [0, 1, 2] for r in runs.children)
    assert [r.info.run_name for r in runs.all if r.info.status == "RUNNING"] == []


# ---------------------------------------------------------------------------------------------- 9


@pytest.mark.e2e
@pytest.mark.parametrize(
    "sig, loader",
    [(signal.SIGTERM, ["data.tile_store=auto"]), (signal.SIGINT, ["data.tile_store=off", "trainer.num_workers=2"])],
)
def test_a_signal_stops_the_sweep_cleanly_and_the_rerun_resumes(tmp_path, sig, loader):
    """SIGTERM while reading the tile store (its gather thread); Ctrl-C with PIL DataLoader workers."""
    tree = make_tree(tmp_path / "tiles", per_class=(24, 6, 6), size=64)
    args = ["-m", *slow_args(tree, *loader), "optimizer.lr=1e-3,1e-2"]
    proc = start(tmp_path, *args)
    wait_for_epoch(tmp_path, proc, 1)
    os.killpg(proc.pid, sig)  # as SLURM (SIGTERM) or a terminal (SIGINT) does: the whole group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-5000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert f"interrupted by {sig.name}" in err.strip().splitlines()[-1]
    assert "re-run the same command to resume" in err.strip().splitlines()[-1]
    runs = mlflow_runs(tmp_path)
    assert len(runs.children) == 1, "the sweep stopped: the next job did not start"
    killed = runs.children[0]
    assert killed.info.status == "KILLED"
    assert killed.data.tags["failure_reason"] == f"interrupted: interrupted by {sig.name}"
    assert runs.parents[0].info.status == "KILLED"
    assert runs.parents[0].data.tags["failure_reason"].startswith(f"interrupted by {sig.name}")
    saved = resume_epoch(tmp_path)
    assert saved >= 1

    out = run_app(tmp_path, *args)  # the rerun needs no process of its own
    assert "resuming MLflow run" in out.stdout + out.stderr
    runs = mlflow_runs(tmp_path)
    resumed = next(r for r in runs.all if r.info.run_id == killed.info.run_id)
    assert resumed.info.status == "FINISHED" and "failure_reason" not in resumed.data.tags
    assert history_steps(tmp_path, resumed) == [0, 1, 2, 3, 4], "each epoch once: nothing lost, nothing twice"
    assert len(runs.children) == 2 and all(r.info.status == "FINISHED" for r in runs.children)


@pytest.mark.e2e
def test_a_killed_sweep_leaves_no_run_running_once_the_same_command_has_run_again(tmp_path):
    """SIGKILL (an OOM kill, power loss): no clean-up runs, the parent and the job's run stay RUNNING;
    the same command, re-run, continues the job under a new parent and closes the old one."""
    tree = make_tree(tmp_path / "tiles", per_class=(24, 6, 6), size=64)
    args = ["-m", *slow_args(tree, "trainer.max_epochs=2"), "optimizer.lr=1e-3,1e-2"]
    proc = start(tmp_path, *args)
    wait_for_epoch(tmp_path, proc, 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    [old] = mlflow_runs(tmp_path).parents
    assert old.info.status == "RUNNING"

    run_app(tmp_path, *args)
    runs = mlflow_runs(tmp_path)
    assert [r.info.run_name for r in runs.all if r.info.status == "RUNNING"] == []
    new = next(r for r in runs.parents if r.info.run_id != old.info.run_id)
    old = next(r for r in runs.parents if r.info.run_id == old.info.run_id)
    assert old.info.status == "KILLED" and new.info.status == "FINISHED"
    assert old.data.tags["failure_reason"] == (
        "interrupted: its sweep process ended without closing it (killed?); the same command, re-run, "
        f"continues its jobs under parent run {new.info.run_id}"
    )
    assert old.data.tags["taken_over_by"] == new.info.run_id
    assert len(runs.children) == 2 and all(r.info.status == "FINISHED" for r in runs.children)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.children} == {new.info.run_id}


# ---------------------------------------------------------------------------------------------- 7


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for the plots and the checkpoint, not for the full model."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_at_the_final_save_keeps_the_job_and_the_rerun_finishes_it(tmp_path, tiny_tree, small_disk):
    (tmp_path / "mlruns").symlink_to(small_disk)  # the store's artifacts go to the small disk
    args = data_args(tiny_tree, "trainer.max_epochs=2")
    proc = run_app(tmp_path, *args, check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "interrupted" in last and "No space left on device" in last and "re-run the same command" in last
    assert "Traceback" not in proc.stderr
    run = mlflow_runs(tmp_path).all[0]
    assert run.info.status == "KILLED" and resume_epoch(tmp_path) == 2

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)  # space freed
    out = run_app(tmp_path, *args)
    assert "retrain" not in out.stdout and "resuming MLflow run" in out.stdout + out.stderr
    runs = mlflow_runs(tmp_path).all
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert history_steps(tmp_path, runs[0]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- 7 (server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``mlflow server`` (SQLite backend, artifacts served) that can be killed and restarted
    on the same port."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        folder.mkdir()
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                "sqlite:///mlflow.db",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.folder / "mlartifacts"),
            ],
            cwd=self.folder,
            env=server_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until_healthy(self.uri, self.proc, self.folder / "server.log")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.mark.e2e
def test_a_tracking_server_outage_is_waited_out_or_interrupts_without_losing_epochs(tmp_path):
    import mlflow

    tree = make_tree(tmp_path / "tiles", per_class=(24, 6, 6), size=64)
    server = Server(tmp_path / "server")
    server.start()
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    try:
        # an outage shorter than tracking.retry_s: waited out, one run, every epoch
        short = tmp_path / "short"
        short.mkdir()
        proc = start(short, *slow_args(tree, f"tracking.uri={server.uri}", "tracking.retry_s=120"), env=quick)
        wait_for_epoch(short, proc, 1)
        server.kill()
        time.sleep(8)
        server.start()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert "retrying for up to 120 s" in out + err
        (run,) = client.search_runs([client.get_experiment_by_name("resnet-sweep").experiment_id])
        assert run.info.status == "FINISHED" and history_steps(short, run, client=client) == [0, 1, 2, 3, 4]

        # an outage longer than tracking.retry_s: the job stops as interrupted, the rerun continues it
        long = tmp_path / "long"
        long.mkdir()
        args = slow_args(tree, f"tracking.uri={server.uri}", "tracking.retry_s=3", "seed=1")
        proc = start(long, *args, env=quick)
        wait_for_epoch(long, proc, 1)
        server.kill()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 75, err[-3000:]
        assert "Traceback" not in err and "re-run the same command to resume" in err.strip().splitlines()[-1]
        saved = resume_epoch(long)
        assert saved >= 1
        server.start()
        rerun = run_app(long, *args, env=quick)  # the rerun needs no process of its own
        assert f"at epoch {saved + 1}" in rerun.stdout + rerun.stderr  # resumed after the last saved epoch
        runs = [
            r
            for r in client.search_runs([client.get_experiment_by_name("resnet-sweep").experiment_id])
            if r.data.params.get("seed") == "1"
        ]
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert history_steps(long, runs[0], client=client) == [0, 1, 2, 3, 4]
    finally:
        server.kill()


# ---------------------------------------------------------------------------------------------- smaller
# (11, a re-run sweep leaves reused runs with their sweep: tests/test_resume.py)


def test_a_single_run_prints_its_test_figures_and_tags_the_code_commit(tmp_path, tiny_tree):
    proc = run_app(tmp_path, *data_args(tiny_tree))
    assert "test loss" in proc.stdout and "test acc" in proc.stdout
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if head:  # run from a folder that is not the project's checkout: the project's commit all the same
        assert mlflow_runs(tmp_path).all[0].data.tags["git_commit"] == head
