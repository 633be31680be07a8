"""Issue 27: a full disk stops the sweep once, named for what it is. Real full disks: a small tmpfs
mounted under the folder a job writes to, filled to the last byte at a chosen moment (checkpoint
save, model save, bank write, store write, MLflow artifact, SQLite store); after the space is freed
the same command finishes the sweep as if nothing had happened."""

from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path

import pytest
from conftest import make_tree, mlflow_runs, run_app
from test_faults import data_args, history_steps

EPOCHS = 3


def sweep_args(tree: Path, cache: Path, *more: str) -> list[str]:
    """Two jobs of 3 epochs on the frozen backbone: the tile store, the feature bank, the head; one
    job at a time (``trainer.batch_heads=off``: the second job starts after the first; a group's
    jobs start together, test_a_full_disk_stops_a_group_whole)."""
    return [
        "-m",
        *data_args(tree, f"trainer.max_epochs={EPOCHS}", "trainer.patience=null", f"data.cache_dir={cache}"),
        "optimizer.lr=1e-3,1e-2",
        "trainer.batch_heads=off",
        *more,
    ]


class Disk:
    """A tmpfs of ``size`` mounted at ``folder``; ``fill()`` takes its last byte, ``free()`` gives it back."""

    def __init__(self, folder: Path, size: str = "4m"):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        self.filler = folder / "filler"

    def fill(self) -> None:
        with contextlib.suppress(OSError), open(self.filler, "ab", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


@pytest.fixture
def disks():
    mounted: list[Disk] = []

    def mount(folder: Path, size: str = "4m") -> Disk:
        mounted.append(Disk(folder, size))
        return mounted[-1]

    yield mount
    for disk in mounted:
        disk.unmount()


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """The same sweep without a fault: what every disturbed sweep must end with."""
    work = tmp_path_factory.mktemp("undisturbed")
    tree = make_tree(work / "tiles")
    run_app(work, *sweep_args(tree, work / "cache"))
    return results(work), tree


def results(work: Path) -> dict:
    """lr -> (status, valid/loss steps and values, test metrics) of each child run."""
    from conftest import client_for

    client = client_for(work)
    out = {}
    for run in mlflow_runs(work).children:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "valid/loss"))
        tests = {k: v for k, v in run.data.metrics.items() if k.startswith(("test/", "best/"))}
        out[run.data.params["optimizer.lr"]] = (run.info.status, history, tests)
    return out


def leftovers(work: Path) -> list[str]:
    """Temp files and folders a failed write could leave: ``*.tmp<pid>``, ``.<name>.tmp<pid>``,
    a cache's ``.<key>-<random>`` folder."""
    found = []
    for path in work.rglob("*"):
        if path.name == "filler":
            continue
        if re.search(r"\.tmp\d+$", path.name) or re.match(r"\.[0-9a-f]{16,}-", path.name):
            found.append(str(path.relative_to(work)))
    return found


def fill_before(monkeypatch, owner, name: str, disk_of, when=lambda *a, **k: True) -> None:
    """Fill the disk just before ``owner.name`` runs (when ``when(*args)`` says so)."""
    real = getattr(owner, name)

    def filled_first(*args, **kwargs):
        if when(*args, **kwargs):
            disk_of().fill()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, filled_first)


def fill_after(monkeypatch, owner, name: str, disk_of, when) -> None:
    real = getattr(owner, name)

    def filled_after(*args, **kwargs):
        result = real(*args, **kwargs)
        if when(*args, **kwargs):
            disk_of().fill()
        return result

    monkeypatch.setattr(owner, name, filled_after)


def moment(case: str, monkeypatch, disk_of) -> None:
    """Where each case fills its disk."""
    from resnet_sweep.data import tiles
    from resnet_sweep.tracking import job_log
    from resnet_sweep.training import features, resume

    if case == "first state":  # the resume state written as the first job's run starts
        fill_before(monkeypatch, resume.Resumer, "started", disk_of)
    elif case == "checkpoint save":  # the resume state after epoch 2 (torch.save: "unexpected pos")
        fill_after(monkeypatch, resume.Resumer, "save", disk_of, lambda self, run_id, epoch, *a: epoch == 1)
    elif case == "model save":  # the full MLflow model, after the last epoch
        fill_before(monkeypatch, job_log, "log_model", disk_of)
    elif case == "MLflow artifact":  # the checkpoint copied into the run's artifacts
        fill_before(monkeypatch, job_log.JobLog, "checkpoint", disk_of)
    elif case == "bank write":  # extracting the feature bank
        fill_before(monkeypatch, features, "extract", disk_of)
    elif case == "store write":  # decoding the tile store
        fill_before(monkeypatch, tiles, "write_store", disk_of)
    elif case == "SQLite store":  # the tracking database, after epoch 1
        fill_after(monkeypatch, resume.Resumer, "save", disk_of, lambda self, run_id, epoch, *a: epoch == 1)


CASES = {  # case -> (folder on the small disk, relative to the working folder; its size; extra overrides)
    "first state": (".resnet-sweep/resume", "4m", []),
    "checkpoint save": (".resnet-sweep/resume", "4m", []),
    "model save": ("mlruns", "200m", ["tracking.log_model=all"]),  # room for 2 models (45 MB) and a partial one
    "MLflow artifact": ("mlruns", "100m", []),  # room for the best model
    "bank write": ("cache/features", "4m", []),
    "store write": ("cache/tiles", "4m", []),
    "SQLite store": ("db", "8m", ["tracking.uri=sqlite:///db/mlflow.db"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_full_disk_stops_the_sweep_once_and_the_same_command_finishes_it(
    tmp_path, disks, undisturbed, monkeypatch, case
):
    expected, tree = undisturbed
    folder, size, more = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    disk = disks(work / folder, size)
    if case == "SQLite store":
        from conftest import fresh_store

        fresh_store(work / folder)
    args = sweep_args(tree, work / "cache", *more)
    with monkeypatch.context() as patch:
        moment(case, patch, lambda: disk)
        proc = run_app(work, *args, check=False, store=case != "SQLite store")
    if case == "SQLite store":
        (work / "mlflow.db").symlink_to(work / folder / "mlflow.db")  # where mlflow_runs reads
    assert proc.returncode == 75, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(rf"interrupted: No space left on device in \S*{re.escape(folder)}\b", last), last
    assert "free space there, then re-run the same command to resume" in last
    if case not in ("model save", "SQLite store"):  # the size of what was being written is known
        assert re.search(r" \(0 B free, about [\d.]+ (B|KB|MB) needed\);", last), last
    assert sum("No space left on device" in line for line in proc.stderr.splitlines()) == 1, proc.stderr[-4000:]
    if case == "store write":  # the sweep's pre-flight decodes every image once, for the check and the store
        assert not (work / "multirun").exists() or not list((work / "multirun").rglob(".hydra")), "no job started"
        assert not (work / "mlflow.db").exists() or mlflow_runs(work).all == []
        assert leftovers(work) == []
        disk.free()
        run_app(work, *args)
        assert results(work) == expected
        return
    assert len(list((work / "multirun").rglob(".hydra"))) == 1, "no second job started"
    runs = mlflow_runs(work)
    if case == "first state":  # its run was deleted: nothing in it, and no re-run would find it
        assert runs.children == []
    elif case != "SQLite store":  # on a full database nothing more can be written, not even KILLED
        [child] = runs.children
        assert child.info.status == "KILLED" and "No space left on device" in child.data.tags["failure_reason"]
    if case != "SQLite store":
        assert not [r for r in runs.all if r.info.status in ("FAILED", "RUNNING")]
        [parent] = runs.parents
        assert parent.info.status == "KILLED" and "No space left on device" in parent.data.tags["failure_reason"]
    assert leftovers(work) == []

    disk.free()
    run_app(work, *args, store=case != "SQLite store")
    assert results(work) == expected
    for run in mlflow_runs(work).children:
        assert history_steps(work, run) == list(range(EPOCHS + 1)), "every epoch once"
    assert not [r.info.run_name for r in mlflow_runs(work).all if r.info.status == "RUNNING"]


def test_a_full_disk_stops_a_group_whole(tmp_path, disks, undisturbed, monkeypatch):
    """The two jobs trained together (trainer.batch_heads=auto): the first one's checkpoint after
    epoch 1 finds the disk full; both stop there, KILLED, and the same command finishes both."""
    expected, tree = undisturbed
    work = tmp_path / "work"
    work.mkdir()
    disk = disks(work / ".resnet-sweep/resume", "4m")
    args = [*sweep_args(tree, work / "cache"), "trainer.batch_heads=auto"]
    with monkeypatch.context() as patch:
        moment("checkpoint save", patch, lambda: disk)
        proc = run_app(work, *args, check=False)
    assert proc.returncode == 75, proc.stderr[-4000:]
    assert "training 2 heads together" in proc.stdout + proc.stderr
    assert sum("No space left on device" in line for line in proc.stderr.splitlines()) == 1, proc.stderr[-4000:]
    runs = mlflow_runs(work)
    assert sorted(r.info.status for r in runs.children) == ["KILLED", "KILLED"]
    assert not [r for r in runs.all if r.info.status in ("FAILED", "RUNNING")]
    assert leftovers(work) == []
    disk.free()
    run_app(work, *args)
    got = results(work)  # bf16 where the CPU has it: the stacked sums round in another order
    assert got.keys() == expected.keys()
    for lr, (status, history, tests) in got.items():
        assert status == expected[lr][0] == "FINISHED"
        assert [step for step, _ in history] == [step for step, _ in expected[lr][1]] == list(range(EPOCHS + 1))
        assert [v for _, v in history] == pytest.approx([v for _, v in expected[lr][1]], abs=1e-3)
        assert tests == pytest.approx(expected[lr][2], abs=1e-3)


def test_a_full_disk_at_the_sweeps_best_model_is_one_warning_and_the_same_command_logs_it(
    tmp_path, disks, undisturbed, monkeypatch
):
    """The last write of a sweep (log_model=best, after every job finished): the results stand, the
    summary is said, the model is logged by the re-run."""
    import mlflow

    from resnet_sweep.sweep import sweep_callback

    _, tree = undisturbed
    work = tmp_path / "work"
    work.mkdir()
    disk = disks(work / "mlruns", "100m")
    args = sweep_args(tree, work / "cache")
    with monkeypatch.context() as patch:
        fill_before(patch, sweep_callback, "log_best_model", lambda: disk)
        proc = run_app(work, *args)
    assert "the best run's model was not logged ([Errno 28] No space left on device" in proc.stdout
    assert "2 finished, 0 failed" in proc.stdout and "Traceback" not in proc.stderr
    assert [r.info.status for r in mlflow_runs(work).all] == ["FINISHED"] * 3

    def ready_models():
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        experiment = mlflow_runs(work).parents[0].info.experiment_id
        models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
        return [m for m in models if str(m.status).endswith("READY")]

    assert ready_models() == []
    disk.free()
    again = run_app(work, *args)
    assert "0 finished, 0 failed, 2 reused" in again.stdout
    assert len(ready_models()) == 1


def test_a_full_disk_is_recognised_by_its_free_space_whatever_the_writer_raised(tmp_path, disks):
    from resnet_sweep.core import faults

    disk = disks(tmp_path / "small", "1m")
    disk.fill()
    torch_save = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    full = faults.disk_full(torch_save, {tmp_path: 0, disk.folder: 4096})
    assert isinstance(full, OSError) and faults.is_infrastructure(full)
    assert str(full) == f"No space left on device in {disk.folder} (0 B free, about 4.0 KB needed)"
    assert faults.disk_full(torch_save, {tmp_path: 0}) is None, "room there: another fault"
    assert faults.disk_full(ConnectionError("Connection refused"), {disk.folder: 0}) is None
    assert faults.disk_full(ValueError("bad value"), {tmp_path: 0}) is None
    sqlite = RuntimeError("(sqlite3.OperationalError) database or disk is full")
    assert str(faults.disk_full(sqlite, {tmp_path: 0})).startswith(f"No space left on device in {tmp_path} (")
