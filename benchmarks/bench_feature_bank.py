"""`make bench`: the study's ResNet18 perceptron grid on the demo data, naive loop vs feature bank.

Runs, in one invocation, `python train.py -m experiment=bench/resnet18_perceptron` twice (13 runs x 20
epochs, same seeds): with `trainer.feature_bank=off` (the backbone runs over every image at every
epoch) and with the bank (features extracted once, from an empty bank cache so extraction is timed).
Prints both wall times, their ratio, the mean |test accuracy difference| between paired runs, and
the bank's extraction throughput beside plain bf16/channels_last ResNet18 inference measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resnet_sweep.engine import autocast, cpu_has_bf16  # noqa: E402


def plain_inference_img_per_s(batch: int, batches: int, device: torch.device) -> float:
    """ResNet18 backbone forward on random images: bf16 autocast (where supported), channels_last."""
    from torchvision.models import resnet18

    model = resnet18()
    model.fc = torch.nn.Identity()
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    precision = "bf16" if (device.type == "cuda" or cpu_has_bf16()) else "32"
    with torch.inference_mode(), autocast(device, precision):
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            model(x).float().cpu()
        seconds = time.perf_counter() - start
    return batch * batches / seconds


def sweep(workdir: Path, bank: str, extra: list[str]) -> float:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "experiment=bench/resnet18_perceptron",
           f"trainer.feature_bank={bank}", "tracking.log_model=none", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def test_accuracies(workdir: Path) -> dict[str, float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {r.info.run_name: r.data.metrics["test/acc"] for r in runs
            if r.data.tags.get("sweep") != "true" and "test/acc" in r.data.metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the two sweeps write (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sweeps")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="resnet-sweep-bench-"))
    cache = root / "cache"
    os.environ["RESNET_SWEEP_CACHE"] = str(cache)
    extra = [f"trainer.max_epochs={args.epochs}", *args.overrides]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # untimed: the demo data exists before either sweep starts
    from hydra import compose, initialize_config_dir

    from resnet_sweep import demo_data

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        demo_data.ensure(compose("train").data)

    plain = plain_inference_img_per_s(64, 12, device)
    naive_s = sweep(root / "naive", "off", extra)
    shutil.rmtree(cache / "features", ignore_errors=True)
    bank_s = sweep(root / "bank", "auto", extra)

    naive_acc, bank_acc = test_accuracies(root / "naive"), test_accuracies(root / "bank")
    pairs = sorted(set(naive_acc) & set(bank_acc))
    diffs = [abs(naive_acc[k] - bank_acc[k]) * 100 for k in pairs]
    meta = json.loads(next((cache / "features").glob("*/meta.json")).read_text())

    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"grid: {len(pairs)} paired runs (resnet18 perceptron, Adam x 7 + SGD x 6 LRs), "
          f"{args.epochs} epochs, demo data {meta['n']}")
    print(f"naive grid (feature_bank=off): {naive_s:8.1f} s")
    print(f"banked grid (feature_bank=auto): {bank_s:8.1f} s  (extraction {meta['seconds']:.1f} s of it, "
          f"{meta['views']} views, {meta['precision']})")
    print(f"speed-up: {naive_s / bank_s:.1f}x")
    print(f"mean |test acc difference| over paired runs: {sum(diffs) / len(diffs):.2f} points "
          f"(max {max(diffs):.2f})")
    print(f"extraction throughput: {meta['img_per_s']:.1f} img/s; plain bf16/channels_last ResNet18 "
          f"inference: {plain:.1f} img/s ({100 * meta['img_per_s'] / plain:.1f}%)")
    for k in pairs:
        print(f"  {k:34s} naive {100 * naive_acc[k]:6.2f}%  bank {100 * bank_acc[k]:6.2f}%")


if __name__ == "__main__":
    main()
