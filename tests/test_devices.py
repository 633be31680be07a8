"""Which GPU each job of a parallel sweep gets (resnet_sweep.training.devices, hardware.resolve_device), and the
memory check before the sweep: on the CPU, with the GPUs faked."""

from __future__ import annotations

import heapq
import logging
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from resnet_sweep.core.errors import UserError
from resnet_sweep.training import devices, hardware

GIB = 2**30


@pytest.fixture(autouse=True)
def _no_slots_held():
    devices.release_slots()
    yield
    devices.release_slots()


def hydra_cfg(
    sweep_dir: Path, *, n_jobs=4, num=0, target="hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
):
    """A job's ``hydra.*`` as a joblib worker sees it (only what the assignment reads)."""
    return OmegaConf.create(
        {
            "mode": "MULTIRUN",
            "launcher": {"_target_": target, "n_jobs": n_jobs},
            "sweep": {"dir": str(sweep_dir)},
            "runtime": {"cwd": str(sweep_dir.parent)},
            "job": {"num": num},
        }
    )


@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_batch_spreads_evenly_k_per_gpu(gpus, k):
    batch = devices.spread(3 * gpus * k, gpus=gpus, jobs_per_gpu=k)
    assert batch == [i % gpus for i in range(3 * gpus * k)]
    at_once = Counter(batch[: gpus * k])  # the first n_jobs = gpus * k jobs run together
    assert at_once == dict.fromkeys(range(gpus), k)
    assert Counter(batch) == dict.fromkeys(range(gpus), 3 * k)
    assert devices.jobs_per_gpu(gpus * k, gpus=gpus) == k


def test_slots_and_gpus_arithmetic():
    assert [devices.gpu_of_slot(s, gpus=2) for s in range(6)] == [0, 1, 0, 1, 0, 1]
    assert devices.jobs_per_gpu(5, gpus=2) == 3  # n_jobs not a multiple of the GPUs: the bound rounds up
    assert devices.jobs_per_gpu(3, gpus=0) == 3
    assert devices.lowest_free([0, 2], slots=4) == 1
    assert devices.lowest_free([0, 1], slots=2) is None
    with pytest.raises(ValueError):
        devices.gpu_of_slot(0, gpus=0)


def simulate(jobs: int, *, gpus: int, k: int, seed: int, die_every: int = 0):
    """joblib's loky pool, as events: n_jobs = gpus * k workers take the jobs in order as they free up
    (durations random); a worker claims the lowest free slot at its first job and holds it until it
    exits; with ``die_every``, every such job's worker exits after it and a fresh worker replaces it.
    Returns each job's (worker, gpu) and the most jobs any GPU ran at once."""
    rng = random.Random(seed)
    n_jobs = gpus * k
    held: dict[int, int] = {}  # worker -> slot
    idle = list(range(n_jobs))
    next_worker = n_jobs
    running: list[tuple[float, int, int]] = []  # (end time, job, worker)
    placed, busy, most, now = {}, Counter(), 0, 0.0
    for job in range(jobs):
        if not idle:
            now, done, worker = heapq.heappop(running)
            busy[devices.gpu_of_slot(held[worker], gpus=gpus)] -= 1
            if die_every and done % die_every == 0:
                del held[worker]  # exits: its lock goes with it
                worker, next_worker = next_worker, next_worker + 1
            idle.append(worker)
        worker = idle.pop(0)
        if worker not in held:
            held[worker] = devices.lowest_free(held.values(), slots=n_jobs)
        gpu = devices.gpu_of_slot(held[worker], gpus=gpus)
        placed[job] = (worker, gpu)
        busy[gpu] += 1
        most = max(most, busy[gpu])
        heapq.heappush(running, (now + rng.uniform(1, 10), job, worker))
    return placed, most


@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("die_every", [0, 3])
def test_with_joblib_workers_at_most_k_jobs_on_a_gpu_and_a_worker_keeps_its_gpu(gpus, k, die_every):
    for seed in range(5):
        placed, most = simulate(40, gpus=gpus, k=k, seed=seed, die_every=die_every)
        assert most <= k
        by_worker: dict[int, set[int]] = {}
        for worker, gpu in placed.values():
            by_worker.setdefault(worker, set()).add(gpu)
        assert all(len(g) == 1 for g in by_worker.values())  # every job of a worker on its one GPU
        first = Counter(gpu for job, (_, gpu) in placed.items() if job < gpus * k)
        assert first == dict.fromkeys(range(gpus), k)  # the first n_jobs jobs: k on each GPU


def other_process_claims(folder: Path, *, slots: int) -> tuple[int, int]:
    """What another worker's claim leaves: its slot locked by an fd this process no longer tracks."""
    key = str(folder.resolve())
    mine = devices._held.pop(key, None)
    slot = devices.claim_slot(folder, slots=slots)
    fd = devices._held.pop(key)[1]
    if mine:
        devices._held[key] = mine
    return slot, fd


def test_claims_take_the_lowest_free_slot_and_exiting_frees_it(tmp_path):
    folder = tmp_path / ".devices"
    a, fd_a = other_process_claims(folder, slots=3)
    b, fd_b = other_process_claims(folder, slots=3)
    assert (a, b) == (0, 1)
    os.close(fd_a)  # worker a exits
    mine = devices.claim_slot(folder, slots=3)
    assert mine == 0
    assert devices.claim_slot(folder, slots=3) == 0  # the same process keeps its slot
    assert (folder / "slot-0.lock").read_text().strip() == str(os.getpid())
    c, fd_c = other_process_claims(folder, slots=3)
    assert c == 2
    devices.release_slots()
    assert devices.claim_slot(folder, slots=2, wait_s=0.3, poll_s=0.1) == 0
    devices.release_slots()
    fd_0 = other_process_claims(folder, slots=3)[1]
    assert devices.claim_slot(folder, slots=2, wait_s=0.3, poll_s=0.1) is None  # 0 and 1 held
    for fd in (fd_b, fd_c, fd_0):
        os.close(fd)


def test_only_a_parallel_joblib_sweep_spreads(tmp_path):
    cfg = hydra_cfg(tmp_path / "sweep", n_jobs=4)
    assert devices.launcher_slots(cfg) == 4
    assert devices.launcher_slots(None) is None
    cfg.mode = "RUN"
    assert devices.launcher_slots(cfg) is None
    basic = hydra_cfg(tmp_path / "sweep", target="hydra._internal.core_plugins.basic_launcher.BasicLauncher")
    del basic.launcher.n_jobs
    assert devices.launcher_slots(basic) is None
    submitit = hydra_cfg(
        tmp_path / "sweep", target="hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    )
    assert devices.launcher_slots(submitit) is None
    import joblib

    assert devices.launcher_slots(hydra_cfg(tmp_path / "sweep", n_jobs=-1)) == joblib.cpu_count()
    assert devices.launcher_slots(hydra_cfg(tmp_path / "sweep", n_jobs=-2)) == max(1, joblib.cpu_count() - 1)


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda with ``n`` GPUs that take no work: ``fake_gpus(n)``; records set_device."""
    current = []

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
        return current

    return install


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_auto_in_joblib_workers_becomes_the_slot_gpu(tmp_path, fake_gpus, gpus):
    current = fake_gpus(gpus)
    sweep = tmp_path / "sweep"
    cfg = hydra_cfg(sweep, n_jobs=2 * gpus)
    got, fds = [], []
    for num in range(2 * gpus):  # n_jobs workers, each at its first job
        cfg.job.num = num
        got.append(hardware.resolve_device("auto", hydra_cfg=cfg))
        if gpus > 1:
            fds.append(devices._held.pop(str((sweep / ".devices").resolve()))[1])  # the next worker
    assert got == [torch.device("cuda", i % gpus) for i in range(2 * gpus)]
    assert current == got  # each became torch's current device
    assert str(got[-1]) == f"cuda:{(2 * gpus - 1) % gpus}"  # what job.py logs as the run's `device` tag
    for fd in fds:
        os.close(fd)


def test_a_worker_keeps_its_gpu_and_explicit_devices_are_kept(tmp_path, fake_gpus):
    fake_gpus(4)
    cfg = hydra_cfg(tmp_path / "sweep", n_jobs=8)
    fd = other_process_claims(tmp_path / "sweep" / ".devices", slots=8)[1]  # another worker holds slot 0
    assert hardware.resolve_device("auto", hydra_cfg=cfg) == torch.device("cuda:1")
    cfg.job.num = 9  # its next job
    assert hardware.resolve_device("cuda", hydra_cfg=cfg) == torch.device("cuda:1")
    assert hardware.resolve_device("cuda:3", hydra_cfg=cfg) == torch.device("cuda:3")
    with pytest.raises(UserError, match=r"trainer.device=cuda:4: only 4 GPU\(s\)"):
        hardware.resolve_device("cuda:4", hydra_cfg=cfg)
    os.close(fd)


def test_outside_a_parallel_sweep_auto_is_the_first_gpu_or_the_cpu(tmp_path, fake_gpus):
    fake_gpus(4)
    assert hardware.resolve_device("auto", hydra_cfg=None) == torch.device("cuda:0")
    single = hydra_cfg(tmp_path / "sweep", n_jobs=4)
    single.mode = "RUN"
    assert hardware.resolve_device("auto", hydra_cfg=single) == torch.device("cuda:0")
    assert not (tmp_path / "sweep").exists()  # no slots claimed
    fake_gpus(0)
    assert hardware.resolve_device("auto", hydra_cfg=hydra_cfg(tmp_path / "sweep")) == torch.device("cpu")
    with pytest.raises(UserError, match="trainer.device=cuda: CUDA is not available"):
        hardware.resolve_device("cuda")


def test_all_slots_taken_falls_back_to_the_job_number(tmp_path, fake_gpus, monkeypatch, caplog):
    fake_gpus(2)
    monkeypatch.setattr(devices, "claim_slot", lambda folder, *, slots: None)
    with caplog.at_level(logging.WARNING, logger="resnet_sweep.training.devices"):
        device = hardware.resolve_device("auto", hydra_cfg=hydra_cfg(tmp_path / "sweep", n_jobs=2, num=3))
    assert device == torch.device("cuda:1")
    assert "all 2 launcher slots taken" in caplog.text


def test_memory_check_one_line_when_k_jobs_do_not_fit():
    assert devices.check_memory(job_bytes=3 * GIB, jobs_per_gpu=4, free=[20 * GIB, 13 * GIB], n_jobs=8) is None
    message = devices.check_memory(job_bytes=3 * GIB, jobs_per_gpu=4, free=[20 * GIB, 10 * GIB], n_jobs=8)
    assert message == (
        "hydra.launcher.n_jobs=8: 4 jobs per GPU need about 4 x 3.0 GiB = 12.0 GiB, but cuda:1 has 10.0 GiB "
        "free; set hydra.launcher.n_jobs=6 (or a smaller trainer.batch_size)"
    )
    assert "\n" not in message
    none_fit = devices.check_memory(job_bytes=3 * GIB, jobs_per_gpu=1, free=[2 * GIB], n_jobs=1)
    assert "free the GPU or use trainer.device=cpu" in none_fit


def test_job_estimate_counts_what_trains(tmp_path):
    model = devices.meta_backbone("resnet18")
    total, largest = devices.activation_values(model, crop_size=224)
    assert largest == 64 * 112 * 112  # conv1's output, traced on the meta device
    assert 9 * largest < total < 10 * largest  # 7.5 M values an image: torchsummary's 31 MB fp32
    args = {"batch_size": 32, "crop_size": 224, "bf16": True, "bank_batch": 0}
    finetune = devices.job_bytes(model, trains_backbone=True, **args)
    head = devices.job_bytes(model, trains_backbone=False, **args)
    assert 1.0 * GIB < finetune < 4 * GIB  # ResNet18, batch 32 bf16: ~1-2 GiB of activations plus a context
    assert devices.CONTEXT_BYTES < head < finetune
    assert devices.job_bytes(model, trains_backbone=True, **{**args, "bf16": False}) > finetune


def sweep_config(**trainer):
    from resnet_sweep.config import schema

    return OmegaConf.create(
        {  # the schema's defaults, as a composed config has them
            "backbone": OmegaConf.merge(schema.BackboneConf, {"name": "resnet18", "freeze": "none"}),
            "trainer": OmegaConf.merge(schema.TrainerConf, trainer),
        }
    )


def test_sweep_memory_check_warns_with_fakes(tmp_path, caplog):
    cfg, hydra = sweep_config(), hydra_cfg(tmp_path / "sweep", n_jobs=8)
    with caplog.at_level(logging.INFO, logger="resnet_sweep.training.devices"):
        assert devices.check_sweep_memory(cfg, hydra, gpus=2, free=[139 * GIB, 139 * GIB]) is None
        assert "8 jobs at once on 2 GPU(s): 4 per GPU" in caplog.text
        message = devices.check_sweep_memory(cfg, hydra, gpus=2, free=[139 * GIB, 4 * GIB])
    assert message.startswith("hydra.launcher.n_jobs=8: 4 jobs per GPU need about 4 x ")
    assert message in caplog.text
    assert devices.check_sweep_memory(sweep_config(device="cpu"), hydra, gpus=2, free=[0, 0]) is None
    assert devices.check_sweep_memory(cfg, None, gpus=2, free=[0, 0]) is None  # not a parallel sweep
    one = devices.check_sweep_memory(sweep_config(device="cuda:1"), hydra, gpus=2, free=[8 * GIB])
    assert one.startswith("hydra.launcher.n_jobs=8: 8 jobs per GPU")  # one named GPU takes all 8


def test_sweep_memory_check_reads_mem_get_info(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    asked = []

    def mem_get_info(i):
        asked.append(i)
        return (1 * GIB, 141 * GIB)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    message = devices.check_sweep_memory(sweep_config(), hydra_cfg(tmp_path / "sweep", n_jobs=2))
    assert asked == [0, 1]
    assert message.startswith("hydra.launcher.n_jobs=2: 1 job per GPU need")


@pytest.mark.e2e
def test_bench_gpus_smoke_assigns_through_real_joblib_workers():
    """benchmarks/bench_gpus.py --smoke: 4 loky workers on 2 pretend GPUs, then the measurement's own
    code on the CPU (the GPU run needs a GPU; without one the script says so, status 2)."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpus.py"
    done = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "at most 2 at once on one (bound 2); each worker on one GPU: True" in done.stdout
    assert "4 GPU(s), k=2: jobs 0..15 on GPUs [0, 1, 2, 3, 0, 1, 2, 3," in done.stdout
    assert "measurement dry run on the CPU: [('cpu', " in done.stdout
    if not torch.cuda.is_available():
        none = subprocess.run([sys.executable, str(bench)], capture_output=True, text=True, timeout=120)
        assert none.returncode == 2
        assert "no CUDA device here" in none.stderr
