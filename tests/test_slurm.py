"""Sweeps through a real one-node SLURM cluster (tests/slurm_cluster.py): ``hydra/launcher=slurm``
submits the grid with sbatch; a job requeued mid-training (``scontrol requeue``, what a preemption
does) and a job past its time limit (SIGUSR2, submitit's checkpoint and requeue) resume from their
last epoch in the same MLflow run; an Optuna study runs its trials through the scheduler against a
shared PostgreSQL storage. Skipped, with one line, where slurm-wlm and munge are not installed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, TRAIN_PY, fresh_store
from slurm_cluster import Cluster, missing
from test_cluster import postgres  # noqa: F401  (the PostgreSQL fixture)

pytestmark = pytest.mark.e2e

# CPU-only jobs of one core; the sweep folder and MLflow store are on this machine's disk, which
# every job of a one-node cluster sees (on a real cluster: a shared filesystem, or tracking=server)
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    started = time.monotonic()
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    print(f"one-node SLURM cluster up in {time.monotonic() - started:.1f} s")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One demo data set for every job of this module."""
    return tmp_path_factory.mktemp("cache")


class Sweep:
    """``python train.py -m ...`` started in ``cwd`` against the cluster, watched through squeue."""

    def __init__(self, cluster: Cluster, cwd: Path, *args: str, env: dict | None = None):
        self.cluster, self.cwd = cluster, cwd
        self.seen: dict[str, set[str]] = {}  # SLURM job id -> states seen (this sweep's jobs only)
        self.earlier = {job["id"] for job in cluster.jobs()}  # the module's earlier tests' jobs
        fresh_store(cwd)
        self.proc = subprocess.Popen(
            [sys.executable, str(TRAIN_PY), "-m", *args, f"hydra.sweep.dir={cwd / 'multirun'}"],
            cwd=cwd,
            env={**cluster.env, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output += line

    def watch(self) -> None:
        for job in self.cluster.jobs():
            if job["name"] == "train" and "[" not in job["id"] and job["id"] not in self.earlier:
                # ("[" marks a pending array's summary line, not a job)
                self.seen.setdefault(job["id"], set()).add(job["state"])

    def log_of(self, job_id: str) -> str:
        base = job_id.split("_")[0]
        logs = sorted((self.cwd / "multirun" / ".submitit").glob(f"{base}*/{job_id}*_log.out"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def wait_for(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.watch()
            found = condition()
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        raise AssertionError(f"{what} did not happen within {timeout:.0f} s:\n{self.output[-3000:]}")

    def finish(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.watch()
            time.sleep(1)
        if self.proc.poll() is None:
            self.proc.kill()
        self._reader.join(timeout=10)
        assert self.proc.returncode == 0, self.output[-4000:]
        return self.output


def runs(cwd: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resnet-sweep")
    all_runs = client.search_runs([experiment.experiment_id])
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, children


def steps_of(client, run, metric: str = "valid/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))


def test_a_grid_is_submitted_as_slurm_jobs_and_lands_under_one_parent_run(cluster, cache, tmp_path):
    sweep = Sweep(cluster, tmp_path, *SLURM, *FAST, f"data.cache_dir={cache}", "optimizer.lr=1e-3,1e-2")
    out = sweep.finish()
    assert "2 finished, 0 failed" in out
    assert len(sweep.seen) == 2 and all(re.fullmatch(r"\d+_[01]", j) for j in sweep.seen), sweep.seen
    client, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.data.params["optimizer.lr"] for r in children) == ["0.001", "0.01"]


NAIVE = [  # epochs of a few seconds each (the naive loop), long enough to interrupt one
    "backbone.weights=none",
    "backbone.crop_size=32",
    "backbone.freeze=none",
    "trainer.num_workers=0",
    "trainer.batch_size=16",
    "trainer.patience=null",
    "optimizer.lr=1e-3",
]


def assert_resumed_in_one_run(sweep: Sweep, cwd: Path, job_id: str, epochs: int) -> None:
    client, parents, children = runs(cwd)
    assert len(children) == 1, [r.info.run_name for r in children]
    run = children[0]
    assert run.info.status == "FINISHED"
    assert steps_of(client, run) == list(range(epochs + 1))  # every epoch logged once, epoch 0 included
    log = sweep.log_of(job_id)
    assert log.count("Starting with JobEnvironment") >= 2, log  # the job ran twice
    assert f"resuming MLflow run {run.info.run_id} at epoch" in log, log


def test_a_requeued_job_resumes_from_its_last_epoch_in_the_same_mlflow_run(cluster, cache, tmp_path):
    epochs = 6
    sweep = Sweep(cluster, tmp_path, *SLURM, *NAIVE, f"data.cache_dir={cache}", f"trainer.max_epochs={epochs}")
    job_id = sweep.wait_for(
        lambda: next((j for j in sweep.seen if "epoch 2:" in sweep.log_of(j)), None), 300, "epoch 2 of the job"
    )
    cluster.run("scontrol", "requeue", job_id)
    out = sweep.finish()
    assert "1 finished, 0 failed" in out
    assert_resumed_in_one_run(sweep, tmp_path, job_id, epochs)


def elapsed_s(cluster: Cluster, job_id: str) -> int:
    """How long the job has run (squeue's [[D-]H:]M:SS)."""
    text = cluster.run("squeue", "-h", "-j", job_id, "-o", "%M").strip().replace("-", ":")
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def job_processes(cwd: Path) -> list[int]:
    """The pids of the submitit job processes of the sweep in ``cwd`` (``python -m submitit.core._submit <folder>``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not a process
            continue
        python = os.path.basename(cmd[0]).startswith(b"python")  # not srun, whose command holds the same
        if python and b"submitit.core._submit" in cmd and any(str(cwd).encode() in c for c in cmd):
            pids.append(int(proc.name))
    return pids


def signal_pending(pid: int, signum: int) -> bool:
    """Whether signal ``signum`` waits to be delivered to (stopped) process ``pid`` (False once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return bool(mask & (1 << (signum - 1)))


def test_a_job_past_its_time_limit_is_signalled_checkpointed_requeued_and_finishes(cluster, cache, tmp_path):
    """Once the job trains, it is paused (SIGSTOP: it waits without using a core) and its time limit
    cut (``scontrol update``, as an admin would) to 45-105 s ahead: with ``signal_delay_s=90`` SLURM
    sends SIGUSR2 at its next check after the remaining time falls under 90 s (SLURM checks limits
    about every 30 s). Once SLURM has signalled it (the signal pending on the paused process, or
    already handled: slurmstepd may continue a task it signals), the limit is given back and the
    job continued (SIGCONT): submitit's handler checkpoints and requeues it, and the requeued job
    finishes in the same MLflow run. (Training through the wait instead cost about 80 CPU-seconds
    of the 2-core CI machine, and a job sized to outlast the window was not always long enough.)"""
    epochs = 6
    sweep = Sweep(
        cluster,
        tmp_path,
        *SLURM,
        "hydra.launcher.signal_delay_s=90",
        *NAIVE,
        f"data.cache_dir={cache}",
        f"trainer.max_epochs={epochs}",
    )
    job_id = sweep.wait_for(
        lambda: next((j for j in sweep.seen if "epoch 2:" in sweep.log_of(j)), None), 300, "epoch 2 of the job"
    )
    pids = job_processes(tmp_path)
    assert pids, "no submitit process of the job found"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        # a limit 45-105 s ahead: signalled at the next check, never killed before it
        minutes = (elapsed_s(cluster, job_id) + 45) // 60 + 1
        cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")
        sweep.wait_for(
            lambda: (
                "this job is timed-out" in sweep.log_of(job_id)
                or any(signal_pending(pid, signal.SIGUSR2) for pid in pids)
            ),
            180,
            "SIGUSR2 from SLURM at the time limit",
        )
        cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    sweep.wait_for(lambda: "this job is timed-out" in sweep.log_of(job_id), 60, "submitit's handler of the signal")
    out = sweep.finish(timeout=600)
    assert "1 finished, 0 failed" in out
    assert_resumed_in_one_run(sweep, tmp_path, job_id, epochs)


def test_an_optuna_study_runs_its_trials_through_the_scheduler_on_postgresql(cluster, cache, tmp_path, postgres):  # noqa: F811
    import optuna

    sweep = Sweep(
        cluster,
        tmp_path,
        *SLURM,
        "hpo=lr_search",
        f"hydra.sweeper.storage={postgres.url('optuna')}",
        "hydra.sweeper.study_name=slurm",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=2",
        *FAST,
        f"data.cache_dir={cache}",
        env={"PGPASSWORD": postgres.password},
    )
    out = sweep.finish()
    assert "3 finished trials (3 COMPLETE, 0 PRUNED, 0 FAIL)" in out, out[-3000:]
    assert len(sweep.seen) == 3, sweep.seen  # 3 SLURM jobs: an array of 2, then one of 1
    os.environ["PGPASSWORD"] = postgres.password
    try:
        study = optuna.load_study(study_name="slurm", storage=postgres.url("optuna"))
    finally:
        os.environ.pop("PGPASSWORD", None)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
    _, parents, children = runs(tmp_path)
    assert len(children) == 3
