"""A head grid as a user runs it, `trainer.batch_heads=auto` against `off`, in one invocation.

Makes a synthetic tile set (PNG, written on every core), a fixed random ResNet18 state dict (so that
every seed shares one backbone, as ImageNet weights would), then runs the real `python train.py -m`:

1. one job alone: builds the tile store and the feature bank (the data work, timed from its log;
   `--smoke` leaves this to step 2 and skips the half-grid sweep: two processes in all);
2. the R-run grid (learning rates x seeds) with `trainer.batch_heads=auto`, store and bank built;
3. the same grid with `trainer.batch_heads=off` on two subsets (the seeds at one learning rate, and
   `--off-runs` runs), store and bank built: their difference gives a run's cost one job at a time,
   and R runs are scaled as fixed + R x that (it says so).

Prints the data work, each mode's seconds end to end, seconds per run, runs per minute, the
speed-up, a grouped job's marginal cost ((T(R) - T(R/2)) / (R/2), from one more grouped sweep of
half the runs), and MLflow's share (time inside the calls a job makes to MLflow, measured in the
sweep's process by wrapping `runs.JobLog._call` and `mlflow.start_run`).

    .venv/bin/python benchmarks/bench_sweep.py                      # 100 runs, 1,600 training tiles
    .venv/bin/python benchmarks/bench_sweep.py --tiles 100000 --crop 224 --tile 256   # a GPU machine
    .venv/bin/python benchmarks/bench_sweep.py --smoke              # the suite's quick check
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# run inside the sweep's process (python -c): time spent in MLflow calls, printed at exit
PROFILED_MAIN = """
import atexit, sys, time
import mlflow
from resnet_sweep.tracking import runs
spent = [0.0]
def timed(fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t
    return wrapper
runs.JobLog._call = timed(runs.JobLog._call)
runs.mlflow.start_run = timed(runs.mlflow.start_run)
atexit.register(lambda: print(f"BENCH mlflow_seconds={spent[0]:.3f}", flush=True))
sys.argv = ["train.py", *sys.argv[1:]]
sys.path.insert(0, REPO)
import runpy
runpy.run_path(TRAIN, run_name="__main__")
"""


def _write_tiles(args) -> None:
    folder, start, count, size, label, seed = args
    from PIL import Image

    rng = np.random.default_rng([seed, start])
    for i in range(start, start + count):
        img = rng.integers(0, 140, (size, size, 3), dtype=np.uint8)
        img[..., label] += 100  # the two classes differ in colour: a head can learn them
        Image.fromarray(img).save(folder / f"tile{i:06d}.png", compress_level=1)


def make_tiles(root: Path, *, train: int, size: int, seed: int = 0) -> Path:
    """``root/{train,valid,test}/{a,b}/*.png``: ``train`` training tiles, a quarter as many for valid
    and test, written on every core."""
    jobs = []
    for split, n in (("train", train), ("valid", max(train // 4, 8)), ("test", max(train // 4, 8))):
        for label, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            per = n // 2
            step = max(per // (4 * os.cpu_count()), 50)
            jobs += [(folder, s, min(step, per - s), size, label, seed) for s in range(0, per, step)]
    with multiprocessing.Pool() as pool:
        pool.map(_write_tiles, jobs)
    return root


def backbone_weights(path: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def train(cwd: Path, args: list[str]) -> tuple[float, str]:
    """``python train.py ARGS`` in ``cwd`` (MLflow's calls timed): (seconds, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = PROFILED_MAIN.replace("REPO", repr(str(REPO))).replace("TRAIN", repr(str(REPO / "train.py")))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"train.py {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}")
    return seconds, out


def figure(pattern: str, text: str) -> float:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=1600, help="training tiles (valid, test: a quarter each)")
    parser.add_argument("--tile", type=int, default=72, help="tile side in pixels")
    parser.add_argument("--crop", type=int, default=64, help="backbone.crop_size")
    parser.add_argument("--lrs", type=int, default=20, help="learning rates (log-spaced, 1e-5 .. 1e-1)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--off-runs", type=int, default=20, help="runs of the larger batch_heads=off subset (scaled)")
    parser.add_argument("--smoke", action="store_true", help="a quick check (the suite): tiny everything")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temp folder)")
    a = parser.parse_args()
    if a.smoke:
        a.tiles, a.tile, a.crop, a.lrs, a.seeds, a.epochs, a.patience, a.off_runs = 48, 40, 32, 2, 2, 2, 2, 4
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tiles = make_tiles(work / "tiles", train=a.tiles, size=a.tile)
    made = time.perf_counter() - t
    weights = backbone_weights(work / "resnet18-random.pt")
    lrs = np.logspace(-5, -1, a.lrs)
    common = [
        "data=imagefolder",
        f"data.root={tiles}",
        f"data.cache_dir={work / 'cache'}",
        f"backbone.weights={weights}",
        f"backbone.crop_size={a.crop}",
        "trainer.num_workers=0",
        f"trainer.max_epochs={a.epochs}",
        f"trainer.patience={a.patience}",
    ]
    grid = [f"optimizer.lr={','.join(f'{lr:.3g}' for lr in lrs)}", f"seed={','.join(map(str, range(a.seeds)))}"]
    runs = a.lrs * a.seeds
    print(f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores); {_device()}")
    print(f"tiles: {a.tiles} training ({a.tile} px, crop {a.crop}) written in {made:.1f} s")

    if not a.smoke:  # the smoke mode's grouped sweep builds them
        (work / "data").mkdir(exist_ok=True)
        seconds, out = train(work / "data", [*common, "trainer.max_epochs=1"])
        store, bank = figure(r"tile store \w+: \d+ images in ([\d.]+) s", out), figure(r"crops in ([\d.]+) s", out)
        print(f"data work: tile store {store:.1f} s, feature bank {bank:.1f} s (one job: {seconds:.1f} s end to end)")

    def sweep(name: str, mode: str, points: list[str]) -> tuple[float, float]:
        folder = work / name
        folder.mkdir(exist_ok=True)
        seconds, out = train(folder, ["-m", *common, f"trainer.batch_heads={mode}", *points])
        heads[mode] = figure(r"heads trained together: \d+ stacked epochs in ([\d.]+) s", out)
        return seconds, figure(r"BENCH mlflow_seconds=([\d.]+)", out)

    heads: dict[str, float] = {}
    auto_s, auto_mlflow = sweep("auto", "auto", grid)
    half_lrs = lrs[: max(a.lrs // 2, 1)]
    half = [f"optimizer.lr={','.join(f'{lr:.3g}' for lr in half_lrs)}", grid[1]]
    half_s = float("nan") if a.smoke else sweep("auto-half", "auto", half)[0]
    marginal = (auto_s - half_s) / (runs - len(half_lrs) * a.seeds)
    # one job at a time on two subsets (one learning rate; --off-runs): a run's cost is the slope, the
    # sweep's fixed cost (process start, pre-flight, report) the intercept; R runs = fixed + R x slope
    per_lr = max(a.off_runs // a.seeds, 2)
    subsets = [lrs[:: max(len(lrs) // per_lr, 1)][:n] for n in (1, per_lr)]
    timed_off = []
    for i, sub in enumerate(subsets):
        seconds, mlflow_s = sweep(f"off-{i}", "off", [f"optimizer.lr={','.join(f'{lr:.3g}' for lr in sub)}", grid[1]])
        timed_off.append((len(sub) * a.seeds, seconds, mlflow_s))
    (n1, t1, _), (n2, t2, off_mlflow) = timed_off
    off_per_run = (t2 - t1) / (n2 - n1)
    off_fixed = t1 - n1 * off_per_run
    off_scaled = off_fixed + runs * off_per_run
    print(
        f"batch_heads=auto: {runs} runs in {auto_s:.1f} s: {auto_s / runs:.2f} s/run, {60 * runs / auto_s:.1f} runs/min; "
        f"MLflow {auto_mlflow:.1f} s ({100 * auto_mlflow / auto_s:.0f}%); the heads' stacked training {heads['auto']:.1f} s"
        + (" (smoke: the data work included)" if a.smoke else "")
    )
    print(
        f"batch_heads=off:  {n1} runs in {t1:.1f} s, {n2} runs in {t2:.1f} s: {off_per_run:.2f} s a run, "
        f"{off_fixed:.1f} s fixed; scaled to {runs} runs: {off_scaled:.1f} s, {60 * runs / off_scaled:.1f} runs/min; "
        f"MLflow {off_mlflow:.1f} s of the {n2} runs' sweep ({100 * off_mlflow / t2:.0f}%)"
    )
    print(
        f"grouped job's marginal cost: {marginal:.3f} s ({runs} runs {auto_s:.1f} s, {len(half_lrs) * a.seeds} runs "
        f"{half_s:.1f} s); one job at a time: {off_per_run:.3f} s"
    )
    print(f"speed-up end to end (off scaled / auto): {off_scaled / auto_s:.1f}x")


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"device {torch.cuda.get_device_name(0)}"
    return "device cpu"


if __name__ == "__main__":
    main()
