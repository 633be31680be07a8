"""A job's cost outside its epochs, at two data sizes: it must not grow with the data.

    .venv/bin/python benchmarks/bench_job_overhead.py [--tiles 2000,20000] [--jobs 4] [--rounds 3] [--smoke]

For each size, a synthetic tile set (two classes, 70/15/15 %, small PNG tiles: the count matters
here, not the pixels) is made on every core, then the real ``train.py -m`` runs in this process
(Hydra's basic launcher, as a user's grid runs): first a one-job sweep that builds what is built
once per data set (the tile store, the feature bank), then ``--rounds`` measured sweeps of ``--jobs`` jobs (the sizes in turn)
(learning rates; ResNet18 frozen, a linear head on the bank, one job at a time, resume off so that
each trains). Per job: its wall time (``job.run_job``) minus its epochs (``engine.fit``) and its test
pass (``engine.evaluate``), the parts that grow with the data by nature. Printed: that per-job
overhead at each size (median and each job) and the ratio largest / smallest size; the sweep's
own pre-flight (once per sweep) is printed apart. ``--smoke``: 100 and 400 tiles, 2 jobs (a quick check that it runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import runpy
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPLITS = {"train": 0.7, "valid": 0.15, "test": 0.15}
CLASSES = ("a_class", "b_class")


def _write_tiles(job: tuple[str, int, int, int]) -> None:
    from PIL import Image

    folder, label, start, count = job
    rng = np.random.default_rng(start * 2 + label)
    for i in range(start, start + count):
        img = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
        img[..., (0, 2)[label]] += 120
        Image.fromarray(img).save(Path(folder) / f"tile{i:06d}.png")


def make_tiles(root: Path, n: int) -> Path:
    """``n`` 40-px PNG tiles under ``root/{train,valid,test}/{a_class,b_class}``, on every core; reused."""
    if (root / "done").exists():
        return root
    jobs = []
    for split, share in SPLITS.items():
        per_class = max(2, round(n * share / len(CLASSES)))
        for label, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(str(folder), label, s, min(500, per_class - s)) for s in range(0, per_class, 500)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_tiles, jobs))
    (root / "done").write_text("ok")
    return root


class Timer:
    """Wraps ``module.name`` so that every call's wall time is recorded in ``self.calls``."""

    def __init__(self, module, name: str):
        self.module, self.name, self.calls = module, name, []
        self.original = getattr(module, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.calls.append(time.perf_counter() - started)

        setattr(module, name, timed)

    def restore(self) -> None:
        setattr(self.module, self.name, self.original)


def run_sweep(cwd: Path, overrides: list[str]) -> str:
    """``python train.py -m OVERRIDES`` in this process, in ``cwd``; returns its output."""
    from hydra.core.global_hydra import GlobalHydra

    out = io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    try:
        os.chdir(cwd)
        sys.argv = [str(REPO / "train.py"), "-m", *overrides]
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(str(REPO / "train.py"), run_name="__main__")
            except SystemExit as e:
                if e.code not in (0, None):
                    message = f"train.py -m {' '.join(overrides)} exited {e.code}:\n{out.getvalue()[-3000:]}"
                    raise RuntimeError(message) from None
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
    return out.getvalue()


def prepare(work: Path, n: int) -> dict:
    """One size: its tiles made (or reused), then a one-job warm-up sweep that builds what is built once
    per data set (the tile store, the feature bank). -> what ``measure`` needs."""
    root = make_tiles(work / f"tiles-{n}", n)
    cwd = work / f"run-{n}"
    cwd.mkdir(exist_ok=True)
    common = [
        "data=imagefolder",
        f"data.root={root}",
        f"data.cache_dir={work / 'cache'}",
        f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}",
        "backbone.weights=none",
        "backbone.crop_size=32",
        "trainer.max_epochs=1",
        "trainer.num_workers=0",
        "trainer.batch_size=32",
        "trainer.bank_views=1",
        "trainer.resume=false",
        "trainer.device=cpu",
    ]
    if "batch_heads:" in (REPO / "conf" / "trainer" / "default.yaml").read_text():
        common.append("trainer.batch_heads=off")  # one job at a time: each job's own epochs are timed
    started = time.perf_counter()
    run_sweep(cwd, [*common, "optimizer.lr=1e-3", f"hydra.sweep.dir=warm-up-{time.strftime('%Y%m%d-%H%M%S')}"])
    return {"n": n, "cwd": cwd, "common": common, "warm_up": time.perf_counter() - started}


def measure(size: dict, jobs: int, round_: int) -> dict:
    """One measured sweep of ``jobs`` jobs on a prepared size: each job's time outside its epochs."""
    from resnet_sweep import job
    from resnet_sweep.sweep import sweep_callback
    from resnet_sweep.training import engine

    timers = [Timer(job, "run_job"), Timer(engine, "fit"), Timer(engine, "evaluate")]
    preflight_timer = Timer(
        sweep_callback, "share_sweep_data" if hasattr(sweep_callback, "share_sweep_data") else "check_store_and_folders"
    )
    lrs = ",".join(f"{lr:.0e}" for lr in np.geomspace(1e-4, 1e-1, jobs))
    folder = f"measured-{time.strftime('%Y%m%d-%H%M%S')}-{round_}"  # a sweep folder of its own
    try:
        run_sweep(size["cwd"], [*size["common"], f"optimizer.lr={lrs}", f"hydra.sweep.dir={folder}"])
    finally:
        for t in [*timers, preflight_timer]:
            t.restore()
    total, fit, test = (t.calls for t in timers)
    return {
        "outside": [a - b - c for a, b, c in zip(total, fit, test, strict=True)],
        "epochs": fit,
        "test": test,
        "preflight": preflight_timer.calls,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", default="2000,20000", help="the data sizes, comma-separated")
    parser.add_argument("--jobs", type=int, default=4, help="jobs in the measured sweep")
    parser.add_argument("--rounds", type=int, default=3, help="measured sweeps per size, the sizes in turn")
    parser.add_argument("--work", default=None, help="folder for tiles, caches and runs (default: a temp folder)")
    parser.add_argument("--smoke", action="store_true", help="100 and 400 tiles, 2 jobs: a quick check that it runs")
    args = parser.parse_args(argv)
    sizes = [100, 400] if args.smoke else [int(v) for v in args.tiles.split(",")]
    jobs = 2 if args.smoke else args.jobs
    rounds = 1 if args.smoke else args.rounds
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    print(
        f"machine: {platform.machine()} {model}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-job-overhead-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [prepare(work, n) for n in sizes]
        for r in results:
            r.update(outside=[], epochs=[], test=[], preflight=[])
        for round_ in range(rounds):  # the sizes in turn: a busy machine's load weighs on both alike
            for r in results:
                for key, values in measure(r, jobs, round_).items():
                    r[key] += values
    for r in results:
        print(
            f"{r['n']:>7,} tiles: a job outside its epochs {statistics.median(r['outside']):.3f} s (median of "
            f"{len(r['outside'])}: {', '.join(f'{v:.3f}' for v in r['outside'])}); its epochs "
            f"{statistics.median(r['epochs']):.3f} s, test pass {statistics.median(r['test']):.3f} s; "
            f"the sweep's pre-flight {statistics.median(r['preflight']):.3f} s (once a sweep); warm-up sweep "
            f"(store, bank) {r['warm_up']:.1f} s"
        )
    small, large = results[0], results[-1]
    ratio = statistics.median(large["outside"]) / statistics.median(small["outside"])
    print(
        f"ratio {large['n']:,} / {small['n']:,} tiles of a job's time outside its epochs: {ratio:.2f} "
        f"({'within' if abs(ratio - 1) <= 0.2 else 'NOT within'} 20%)"
    )


if __name__ == "__main__":
    main()
