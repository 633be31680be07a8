"""Several GPUs: k fine-tuning jobs at once on one GPU against one job alone, in aggregate images/s.

    python benchmarks/bench_gpus.py                  # a GPU machine: k=4 jobs on cuda:0 vs one job (~2 min)
    python benchmarks/bench_gpus.py --k 2 --gpus all # k jobs on every visible GPU
    python benchmarks/bench_gpus.py --smoke          # the CPU, seconds: the assignment through real joblib
                                                     # workers, then this script's measurement, tiny

Each job is a joblib (loky) worker process, as with `hydra/launcher=gpus`: it claims a launcher slot
(resnet_sweep.training.devices.claim_slot) and trains on GPU `slot mod GPUs`, fine-tuning a whole ResNet18
(batch 32, 224 px, bf16 autocast, SGD) with the jobs' own epoch loop (engine.train_one_epoch) on synthetic
batches already on the device: the GPU's share, without the data path. The jobs warm up, wait for
each other, then train for --seconds at once. Printed: the device and the img/s of each job, its
peak memory against resnet_sweep.training.devices' estimate, the aggregate of the k jobs, and its ratio to
one job alone (issue 24's target: >= 2.5x for k=4 on one H200).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from joblib import Parallel, delayed  # noqa: E402

from resnet_sweep.training import devices  # noqa: E402  (no torch at import: the smoke's workers start fast)

TARGET = 2.5  # issue 24: k=4 jobs on one GPU >= 2.5x one job's img/s


def job(
    *, slots_dir: str, slots: int, gpus: int, ready_dir: str, together: int, seconds: float, batch: int, crop: int
) -> dict:
    """One fine-tuning job in a worker: claim a slot, take its GPU (the CPU when ``gpus`` is 0), warm
    up, wait until ``together`` jobs are ready, then train for ``seconds``; its img/s and peak memory."""
    import torch
    from torchvision import models as tvm

    from resnet_sweep.training import engine

    slot = devices.claim_slot(Path(slots_dir), slots=slots)
    if gpus:
        device = torch.device("cuda", devices.gpu_of_slot(slot, gpus=gpus))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    torch.manual_seed(slot)
    model = torch.nn.Sequential(tvm.resnet18(num_classes=1), torch.nn.Flatten(0))  # one logit: 2 classes
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batches = [
        (torch.randn(batch, 3, crop, crop, device=device), torch.randint(0, 2, (batch,), device=device))
        for _ in range(4)
    ]

    def steps(n: int) -> None:
        engine.train_one_epoch(
            model, batches * (n // len(batches)), device=device, precision="auto", epoch=1, optimizer=optimizer
        )

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps(8)  # cuDNN's choices, the allocator's pools
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Path(ready_dir, f"{slot}").touch()
    deadline = time.monotonic() + 600
    while len(list(Path(ready_dir).iterdir())) < together and time.monotonic() < deadline:
        time.sleep(0.05)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        steps(len(batches) * 5)
        images += batch * len(batches) * 5
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"slot": slot, "device": str(device), "img_s": images / elapsed, "peak_gib": peak / devices.GIB}


def run(*, k: int, gpus: int, seconds: float, batch: int, crop: int) -> list[dict]:
    """``k`` jobs per GPU on ``gpus`` GPUs (0: k jobs on the CPU) at once, through joblib's workers."""
    n_jobs = k * max(gpus, 1)
    with tempfile.TemporaryDirectory(prefix="rs-gpus-") as tmp:
        slots_dir, ready_dir = Path(tmp, "slots"), Path(tmp, "ready")
        ready_dir.mkdir()
        kwargs = {"slots_dir": str(slots_dir), "slots": n_jobs, "gpus": gpus, "ready_dir": str(ready_dir)}
        # n_jobs >= 2: joblib runs a lone job in this process otherwise; here every job has a worker of its own
        return Parallel(n_jobs=max(n_jobs, 2))(
            delayed(job)(**kwargs, together=n_jobs, seconds=seconds, batch=batch, crop=crop) for _ in range(n_jobs)
        )


def smoke_job(i: int, *, slots_dir: str, slots: int, gpus: int) -> tuple[int, int, int, float, float]:
    """A job of the smoke test: claims its worker's slot, sleeps a random while; (job, pid, gpu, start, end)."""
    import os

    start = time.monotonic()
    gpu = devices.gpu_of_slot(devices.claim_slot(Path(slots_dir), slots=slots), gpus=gpus)
    time.sleep(random.Random(i).uniform(0.02, 0.2))
    return i, os.getpid(), gpu, start, time.monotonic()


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most of these (start, end) intervals that overlap at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def smoke() -> int:
    """The assignment on the CPU: the planned spread for 1, 2 and 4 GPUs, then 16 jobs of random
    lengths through 4 real joblib workers sharing 2 pretend GPUs; 0 when every bound holds."""
    for gpus in (1, 2, 4):
        for k in (1, 2, 4):
            plan = devices.spread(gpus * k * 2, gpus=gpus, jobs_per_gpu=k)
            print(f"{gpus} GPU(s), k={k}: jobs 0..{len(plan) - 1} on GPUs {plan}")
    gpus, k = 2, 2
    with tempfile.TemporaryDirectory(prefix="rs-gpus-") as tmp:
        done = Parallel(n_jobs=gpus * k)(
            delayed(smoke_job)(i, slots_dir=tmp, slots=gpus * k, gpus=gpus) for i in range(16)
        )
    per_worker = {pid: {g for _, p, g, _, _ in done if p == pid} for _, pid, _, _, _ in done}
    worst = max(most_at_once([(s, e) for _, _, g, s, e in done if g == gpu]) for gpu in range(gpus))
    print(
        f"joblib, {gpus * k} workers on {gpus} pretend GPUs: jobs per GPU {dict(sorted(Counter(g for _, _, g, _, _ in done).items()))}, "
        f"at most {worst} at once on one (bound {k}); each worker on one GPU: {all(len(g) == 1 for g in per_worker.values())}"
    )
    ok = worst <= k and all(len(g) == 1 for g in per_worker.values())
    rows = run(k=2, gpus=0, seconds=0.3, batch=4, crop=32)  # the measurement's own code, tiny, on the CPU
    print(f"measurement dry run on the CPU: {[(r['device'], round(r['img_s'])) for r in rows]} img/s")
    return 0 if ok and len(rows) == 2 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4, help="jobs at once per GPU (default 4)")
    parser.add_argument("--gpus", default="1", help="GPUs to use: a number, or all (default 1: cuda:0)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured training time of each job")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="the assignment and a tiny dry run, on the CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke()
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print(
            "bench_gpus.py: no CUDA device here; it measures k fine-tuning jobs at once on a GPU against one "
            "job. Run it on a GPU machine, or --smoke for the assignment on this CPU.",
            file=sys.stderr,
        )
        return 2
    visible = torch.cuda.device_count()
    gpus = visible if args.gpus == "all" else min(int(args.gpus), visible)
    print(f"torch {torch.__version__}, {visible} visible GPU(s): {torch.cuda.get_device_name(0)}; using {gpus}")
    model = devices.meta_backbone("resnet18")
    estimate = devices.job_bytes(
        model, batch_size=args.batch, crop_size=224, bf16=True, trains_backbone=True, bank_batch=0
    )
    print(
        f"ResNet18 fine-tuning, batch {args.batch}, 224 px, bf16: devices' estimate {estimate / devices.GIB:.2f} GiB a job"
    )
    one = run(k=1, gpus=1, seconds=args.seconds, batch=args.batch, crop=224)[0]
    print(f"1 job: {one['device']} {one['img_s']:.0f} img/s, peak {one['peak_gib']:.2f} GiB allocated")
    rows = run(k=args.k, gpus=gpus, seconds=args.seconds, batch=args.batch, crop=224)
    for r in sorted(rows, key=lambda r: r["slot"]):
        print(f"  job in slot {r['slot']}: {r['device']} {r['img_s']:.0f} img/s, peak {r['peak_gib']:.2f} GiB")
    total = sum(r["img_s"] for r in rows)
    ratio = total / one["img_s"]
    per_gpu = ratio / gpus
    verdict = f"target >= {TARGET}x per GPU: {'met' if per_gpu >= TARGET else 'missed'}" if args.k == 4 else ""
    print(
        f"{args.k} jobs per GPU on {gpus} GPU(s): {total:.0f} img/s in all = {ratio:.2f}x one job "
        f"({per_gpu:.2f}x per GPU) {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
