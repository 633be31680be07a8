"""Scale out: launchers, an MLflow server on PostgreSQL, one Optuna study shared by two sweeps.

The integration test starts and stops its own PostgreSQL server (initdb in a temporary folder, a
free loopback port, as the ``postgres`` user when run as root) and its own ``mlflow server``; it is
skipped only when the PostgreSQL binaries are absent (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    FAST,
    REPO,
    TRAIN_PY,
    assert_interrupted_point_ran_again,
    compose_cfg,
    make_tree,
    mlflow_runs,
    run_app,
    server_env,
    wait_until_healthy,
)
from omegaconf import OmegaConf

from resnet_sweep.data.cores import threads_per_job

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
OPTUNA = "hydra_plugins.resnet_sweep_optuna.optuna_sweeper.OptunaSweeper"
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def node(target: str, **keys):
    return OmegaConf.create({"_target_": target, **keys})


@pytest.mark.parametrize(
    "launcher, sweeper, cores, threads",
    [
        (node(JOBLIB, n_jobs=2), node(BASIC), 2, 1),  # 2 jobs at once on 2 cores
        (node(JOBLIB, n_jobs=4), node(BASIC), 16, 4),
        (node(JOBLIB, n_jobs=-1), node(BASIC), 8, 1),  # joblib's -1: as many jobs as cores
        (node(JOBLIB, n_jobs=-2), node(BASIC), 8, 1),
        (node(JOBLIB, n_jobs=4), node(OPTUNA, n_jobs=1), 8, None),  # the sweeper hands out 1 trial at a time
        (node(JOBLIB, n_jobs=4), node(OPTUNA, n_jobs=2), 8, 4),
        (node(SUBMITIT_LOCAL, cpus_per_task=1), node(OPTUNA, n_jobs=1), 2, 1),
        (node(SUBMITIT_LOCAL, cpus_per_task=None), node(OPTUNA, n_jobs=4), 8, 2),
        (node(SUBMITIT_SLURM, cpus_per_task=8), node(BASIC), 64, 8),
        (node(SUBMITIT_SLURM, cpus_per_task=None), node(BASIC), 4, 4),  # the allocation's cores
        (node("hydra._internal.core_plugins.basic_launcher.BasicLauncher"), node(BASIC), 8, None),
    ],
)
def test_parallel_jobs_split_the_cores(launcher, sweeper, cores, threads):
    assert threads_per_job(launcher, sweeper, cores) == threads


def compose(*overrides: str):
    return compose_cfg(*overrides, hydra=True)


def test_launcher_presets_and_tracking_server_compose(monkeypatch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated schema matching for our presets
        slurm = compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2")
        plain = {
            name: compose(f"hydra/launcher={name}").hydra.launcher
            for name in ("submitit_slurm", "submitit_local", "joblib")
        }
    launcher = slurm.hydra.launcher
    assert launcher._target_ == SUBMITIT_SLURM
    assert (
        launcher.partition,
        launcher.gpus_per_node,
        launcher.timeout_min,
        launcher.array_parallelism,
        launcher.cpus_per_task,
    ) == ("gpu", 2, 240, 16, 8)
    assert plain["submitit_slurm"]._target_ == SUBMITIT_SLURM and plain["submitit_slurm"].gpus_per_node is None
    assert plain["submitit_local"]._target_ == SUBMITIT_LOCAL
    assert plain["joblib"]._target_ == JOBLIB and plain["joblib"].n_jobs == -1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert compose("tracking=server").tracking.uri == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking = compose("tracking=server").tracking
    assert tracking.uri == "http://127.0.0.1:5000" and tracking.experiment == "resnet-sweep"


@pytest.mark.e2e
def test_make_server_uses_postgresql_when_given_else_sqlite():
    def dry_run(**env):
        out = subprocess.run(
            ["make", "-n", "-s", "server", "PORT=5999"],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        ).stdout
        return subprocess.run(
            ["bash", "-c", f"echo {out.split('mlflow server', 1)[1]}"],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        ).stdout

    assert "--backend-store-uri sqlite:///mlflow.db" in dry_run()
    postgres = dry_run(MLFLOW_BACKEND_STORE_URI="postgresql://mlflow@db:5432/mlflow")
    assert "--backend-store-uri postgresql://mlflow@db:5432/mlflow" in postgres
    assert (
        "--host 127.0.0.1 --port 5999" in postgres
        and "--serve-artifacts --artifacts-destination ./mlartifacts" in postgres
    )


def test_an_unreachable_optuna_storage_is_one_line_naming_the_key(tmp_path, tiny_tree):
    proc = run_app(
        tmp_path,
        "-m",
        "hpo=lr_search",
        "hydra.sweeper.storage=postgresql://sweep:s3cret@127.0.0.1:9/optuna",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        check=False,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "hydra.sweeper.storage=postgresql://sweep:***@127.0.0.1:9/optuna: cannot open the Optuna storage (connection"
    ), proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- PostgreSQL + MLflow server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    candidates = [shutil.which("pg_ctl"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)]
    for pg_ctl in filter(None, candidates):
        folder = Path(pg_ctl).resolve().parent
        if (folder / "initdb").exists():
            return folder
    return None


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    ctl: list | None = None  # pg_ctl -D <data>, as the postgres user when run as root

    def url(self, database: str) -> str:
        """No password in the URL: libpq reads PGPASSWORD."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str) -> None:
        """``pg_ctl restart -m fast``, ``stop -m fast``, ``start``: the server's own start and stop."""
        subprocess.run([*self.ctl, "-w", "-t", "60", *args], check=True, capture_output=True, timeout=90)

    def query(self, sql: str, database: str = "optuna") -> list:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=database, connect_timeout=5
        ) as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on a free loopback port, with a password (scram-sha-256)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="resnet-sweep-pg-"))  # /tmp: reachable by the postgres user
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    pg = Postgres(port=free_port(), user="sweep", password="pg-s3cret-pw")
    pwfile = folder / "pw"
    pwfile.write_text(pg.password + "\n")
    if as_user:
        shutil.chown(pwfile, "postgres")
    data = folder / "data"

    def run(*cmd):
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            pg.user,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {folder} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(folder / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        pg.ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log")]
    except subprocess.CalledProcessError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise AssertionError(f"PostgreSQL did not start: {e.stderr}") from None
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password, dbname="postgres", autocommit=True
        ) as conn:
            for database in ("mlflow", "optuna"):
                conn.execute(f"CREATE DATABASE {database}")
        yield pg
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """``mlflow server`` as `make server` starts it: PostgreSQL backend store, artifacts served
    through the server from a local folder."""
    port = free_port()
    folder = tmp_path / "server"
    folder.mkdir()
    env = server_env(PGPASSWORD=postgres.password)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            "--backend-store-uri",
            postgres.url("mlflow"),
            "--serve-artifacts",
            "--artifacts-destination",
            str(folder / "mlartifacts"),
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(uri, proc, folder / "server.log")
        yield uri, folder / "mlartifacts"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.e2e
def test_two_sweeps_share_one_optuna_study_in_postgresql_and_log_to_an_mlflow_server(
    tmp_path, postgres, mlflow_server, monkeypatch
):
    import mlflow
    import optuna
    import torch
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    uri, artifacts = mlflow_server
    tree = make_tree(tmp_path / "tiles")
    args = [
        "-m",
        "hpo=lr_search",
        f"hydra.sweeper.storage={postgres.url('optuna')}",
        "hydra.sweeper.study_name=shared",
        "hydra.sweeper.n_trials=4",
        "tracking=server",
        f"tracking.uri={uri}",
        *FAST,
        "data=imagefolder",
        f"data.root={tree}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PGPASSWORD": postgres.password}
    env.pop("HYDRA_FULL_ERROR", None)
    sweeps = []
    # two machines: separate working folders; one runs its trials through submitit, one in its own process
    launchers = {"machine_a": ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1"], "machine_b": []}
    for machine, launcher in launchers.items():
        cwd = tmp_path / machine
        cwd.mkdir()
        out = open(cwd / "sweep.log", "w")
        sweeps.append(
            (
                cwd,
                out,
                subprocess.Popen(
                    [sys.executable, str(TRAIN_PY), *args, *launcher],
                    cwd=cwd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                ),
            )
        )
    try:
        for cwd, out, proc in sweeps:
            proc.wait(timeout=400)
    finally:
        for cwd, out, proc in sweeps:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
    logs = [(cwd / "sweep.log").read_text() for cwd, _, _ in sweeps]
    for (cwd, _, proc), text in zip(sweeps, logs):
        assert proc.returncode == 0, f"{cwd.name} exited {proc.returncode}:\n{text[-6000:]}"
        assert postgres.password not in text

    # the study: 4 finished trials, each number once, taken by both sweeps
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    study = optuna.load_study(study_name="shared", storage=postgres.url("optuna"))
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4, [(t.number, t.state.name, t.system_attrs) for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.params["optimizer.lr"] for t in finished}) == 4, "the sweeps do not repeat each other's points"
    counted = [t for t in trials if not t.system_attrs.get("resnet_sweep:released")]
    assert len(counted) == 4
    owners = {t.system_attrs["resnet_sweep:owner"]["pid"] for t in finished}
    assert len(owners) == 2, "both sweeps took trials"

    # MLflow on the server: one parent run for the study, 4 children with metrics and checkpoints
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("resnet-sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.run_name == "study-shared"
    complete = sum(t.state == TrialState.COMPLETE for t in finished)
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["summary"] == f"{complete} COMPLETE, {4 - complete} PRUNED, 0 FAIL"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4 and len(runs) == 5
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == sorted(t.number for t in finished)
    for run in children:
        assert run.info.status in ("FINISHED", "KILLED")  # KILLED = pruned
        assert {"valid/loss", "train/loss"} <= set(run.data.metrics)
        assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/best.pt"]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), "artifacts go through the server"
    assert len(list(artifacts.rglob("best.pt"))) == 4

    # the server's database as a direct tracking URI: reached at once, the password from PGPASSWORD
    from resnet_sweep.tracking.store import connect

    previous = mlflow.get_tracking_uri()
    try:
        assert (
            connect(OmegaConf.create({"uri": postgres.url("mlflow"), "experiment": "resnet-sweep"}))
            == experiment.experiment_id
        )
    finally:
        mlflow.set_tracking_uri(previous)

    # downloadable through the server
    done = next(r for r in children if r.info.status == "FINISHED")
    path = mlflow.artifacts.download_artifacts(
        run_id=done.info.run_id,
        artifact_path="checkpoint/best.pt",
        dst_path=str(tmp_path / "download"),
        tracking_uri=uri,
    )
    assert torch.load(path, weights_only=True)["backbone"]


# ---------------------------------------------------------------- the Optuna database goes away mid-sweep


def outage_args(postgres, tree, *more):
    # the naive loop on 56-px crops, 2 epochs (after epoch 0, the untrained model): trials slow
    # enough to be caught training, each reporting epochs 0, 1, 2 to its trial
    return [
        "-m",
        "hpo=lr_search",
        f"hydra.sweeper.storage={postgres.url('optuna')}",
        "hydra.sweeper.study_name=outage",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=null",
        *FAST,
        "data=imagefolder",
        f"data.root={tree}",
        "backbone.crop_size=56",
        "trainer.max_epochs=2",
        "trainer.patience=null",
        "trainer.feature_bank=off",
        *more,
    ]


def outage_tree(tmp_path):
    return make_tree(tmp_path / "tiles", per_class=(12, 4, 4), size=64)


@dataclass
class Sweep:
    proc: subprocess.Popen
    cwd: Path

    @property
    def log(self) -> str:
        return (self.cwd / "stdout.log").read_text() + (self.cwd / "stderr.log").read_text()

    @property
    def stderr(self) -> str:
        return (self.cwd / "stderr.log").read_text()


@contextlib.contextmanager
def sweep_in_background(cwd: Path, postgres: Postgres, args: list[str]):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PGPASSWORD": postgres.password}
    env.pop("HYDRA_FULL_ERROR", None)
    with open(cwd / "stdout.log", "w") as out, open(cwd / "stderr.log", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(TRAIN_PY), *args], cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            yield Sweep(proc, cwd)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def epochs_reported(postgres: Postgres, trial_number: int) -> int:
    try:
        return postgres.query(
            "select count(*) from trials t join trial_intermediate_values v on v.trial_id = t.trial_id"
            f" where t.number = {trial_number}"
        )[0][0]
    except Exception:  # the tables do not exist yet
        return 0


def wait_for(sweep: Sweep, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert sweep.proc.poll() is None, f"the sweep ended before the fault:\n{sweep.log[-4000:]}"
        assert time.time() < deadline, f"timed out:\n{sweep.log[-4000:]}"
        time.sleep(0.1)


def optuna_study(postgres: Postgres, monkeypatch, name: str = "outage"):
    import optuna

    monkeypatch.setenv("PGPASSWORD", postgres.password)
    return optuna.load_study(study_name=name, storage=postgres.url("optuna"))


@pytest.mark.e2e
def test_a_database_restart_and_a_12s_outage_mid_trial_cost_no_trial(tmp_path, postgres, monkeypatch):
    args = outage_args(postgres, outage_tree(tmp_path), "hydra.sweeper.storage_retry_s=60")
    with sweep_in_background(tmp_path, postgres, args) as sweep:
        wait_for(sweep, lambda: epochs_reported(postgres, 0) >= 1)
        postgres.pg_ctl("restart", "-m", "fast")  # trial 0 is training
        wait_for(sweep, lambda: epochs_reported(postgres, 1) >= 1)
        postgres.pg_ctl("stop", "-m", "fast")  # trial 1 is training
        time.sleep(12)
        postgres.pg_ctl("start")
        sweep.proc.wait(timeout=400)
    log = sweep.log
    assert sweep.proc.returncode == 0, log[-6000:]
    assert "2 finished trials (2 COMPLETE, 0 PRUNED, 0 FAIL)" in log
    assert "Traceback" not in log and "exceeding max length" not in log
    warnings = [line for line in log.splitlines() if "is unreachable" in line]
    assert 1 <= len(warnings) <= 2, warnings  # one line per outage (the restart may go unnoticed)
    trials = optuna_study(postgres, monkeypatch).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2, [
        (t.number, t.state.name, t.system_attrs) for t in trials
    ]
    assert all(sorted(t.intermediate_values) == [0, 1, 2] for t in trials), "every epoch reached its trial"


@pytest.mark.e2e
def test_a_database_down_past_the_retry_time_stops_the_sweep_in_one_line_and_the_same_command_resumes(
    tmp_path, postgres, monkeypatch
):
    args = outage_args(postgres, outage_tree(tmp_path), "hydra.sweeper.storage_retry_s=3")
    with sweep_in_background(tmp_path, postgres, args) as sweep:
        wait_for(sweep, lambda: epochs_reported(postgres, 0) >= 1)
        postgres.pg_ctl("stop", "-m", "fast")  # trial 0 is training; the database stays down
        stopped = time.monotonic()
        sweep.proc.wait(timeout=120)
        waited = time.monotonic() - stopped
    assert sweep.proc.returncode != 0
    stderr = sweep.stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"hydra\.sweeper\.storage=postgresql://sweep@127\.0\.0\.1:{postgres.port}/optuna: the Optuna storage is "
        r"unreachable for 3 s \(.+\); the study and its finished trials are kept: once the database is back, "
        r"re-run the same command to resume \(hydra\.sweeper\.storage_retry_s=3 is how long a sweep waits\)",
        last,
    ), stderr[-4000:]
    assert "Traceback" not in sweep.log
    assert waited < 60, waited
    [parent] = mlflow_runs(tmp_path).parents
    assert parent.info.status == "FAILED" and "unreachable" in parent.data.tags["failure_reason"]

    postgres.pg_ctl("start")
    out = run_app(tmp_path, *args, env={"PGPASSWORD": postgres.password}).stdout
    assert "2 finished trials (2 COMPLETE, 0 PRUNED, 0 FAIL)" in out
    assert_interrupted_point_ran_again(optuna_study(postgres, monkeypatch).trials)
