"""`make bench`: the study's ResNet18 perceptron grid on the demo data, naive loop vs feature bank.

Runs, in one invocation, `python train.py -m experiment=bench/resnet18_perceptron` twice (13 runs x 20
epochs, same seeds): with `trainer.feature_bank=off` (the backbone runs over every image at every
epoch) and with the bank (features extracted once, from an empty bank cache so extraction is timed).
Prints both wall times, their ratio, the mean |test accuracy difference| between paired runs, and
the bank's extraction throughput beside plain bf16/channels_last ResNet18 inference measured here.

The plain figure is measured as the bank extracts: same batch size, as many images, and right
before and right after the banked sweep (this 2-core VM's throughput drifts by up to 10% over tens
of seconds, so a figure taken minutes away from the extraction is not comparable). Then
``--rounds`` extractions of the same bank in this process, each followed by a plain measurement,
give the ratio again with the drift averaged out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resnet_sweep.training.hardware import autocast, keep_freed_memory, uses_bf16  # noqa: E402


def plain_inference_img_per_s(images: int, batch: int, device: torch.device) -> float:
    """ResNet18 backbone forward on random images, ``images`` of them in batches of ``batch`` (as the
    bank extracts): bf16 autocast (where supported), channels_last, features copied back to the CPU."""
    from torchvision.models import resnet18

    model = resnet18()
    model.fc = torch.nn.Identity()
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, "auto"):
        model(x)  # warm-up
        done, start = 0, time.perf_counter()
        while done < images:
            n = min(batch, images - done)
            model(x[:n]).float().cpu()
            done += n
        seconds = time.perf_counter() - start
    return images / seconds


def interleaved(
    cfg, splits, rounds: int, images: int, batch: int, device: torch.device, plain_before: float
) -> list[tuple[float, float]]:
    """``rounds`` x (extract the sweep's bank in this process, then plain inference): (extraction
    img/s, plain img/s averaged over the measurements just before and just after it)."""
    from resnet_sweep.training import features, models

    backbone = models.build_classifier(cfg.backbone, cfg.head, seed=int(cfg.seed)).model.backbone
    files, labels = features.samples_of(splits)
    out, before = [], plain_before
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            stats = features.extract(
                backbone,
                files,
                labels,
                splits.crop_size,
                splits.mean,
                splits.std,
                int(cfg.trainer.bank_views),
                splits.crop_seed,
                device,
                Path(tmp),
                batch_size=batch,
                resize=splits.resize,
            )
        after = plain_inference_img_per_s(images, batch, device)
        out.append((stats["img_per_s"], (before + after) / 2))
        before = after
    return out


def sweep(workdir: Path, bank: str, extra: list[str]) -> float:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "experiment=bench/resnet18_perceptron",
        f"trainer.feature_bank={bank}",
        "tracking.log_model=none",
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def test_accuracies(workdir: Path) -> dict[str, float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {
        r.info.run_name: r.data.metrics["test/acc"]
        for r in runs
        if r.data.tags.get("sweep") != "true" and "test/acc" in r.data.metrics
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the two sweeps write (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="in-process extraction / plain inference rounds")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sweeps")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="resnet-sweep-bench-"))
    cache = root / "cache"
    os.environ["RESNET_SWEEP_CACHE"] = str(cache)
    extra = [f"trainer.max_epochs={args.epochs}", *args.overrides]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # untimed: the demo data exists before either sweep starts
    from hydra import compose, initialize_config_dir

    from resnet_sweep.data import loading
    from resnet_sweep.training import features

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=bench/resnet18_perceptron", *extra])
    splits = loading.job_splits(cfg)  # makes the demo data
    batch = features.extract_batch(cfg, device)
    # crops the bank holds: bank_views per training image, one per valid/test image
    images = (
        int(cfg.trainer.bank_views) * len(splits.train.dataset) + len(splits.valid.dataset) + len(splits.test.dataset)
    )
    # for reference: plain inference with glibc's default malloc; then the setting every job uses
    # (hardware.keep_freed_memory), under which every later figure here is measured
    untuned = plain_inference_img_per_s(images, batch, device)
    tuned = keep_freed_memory()

    naive_s = sweep(root / "naive", "off", extra)
    shutil.rmtree(cache / "features", ignore_errors=True)
    # the plain figure over as many images as the bank extracts, just before and just after it
    before = plain_inference_img_per_s(images, batch, device)
    bank_s = sweep(root / "bank", "auto", extra)
    after = plain_inference_img_per_s(images, batch, device)
    rounds = interleaved(cfg, splits, args.rounds, images, batch, device, after) if args.rounds else []

    naive_acc, bank_acc = test_accuracies(root / "naive"), test_accuracies(root / "bank")
    pairs = sorted(set(naive_acc) & set(bank_acc))
    diffs = [abs(naive_acc[k] - bank_acc[k]) * 100 for k in pairs]
    meta = json.loads(next((cache / "features").glob("*/meta.json")).read_text())
    assert meta["crops"] == images and meta["batch"] == batch, (meta, images, batch)
    plain = (before + after) / 2

    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, malloc keeps freed memory: {'yes' if tuned else 'no'} "
        f"(plain inference with glibc's defaults: {untuned:.1f} img/s)"
    )
    print(
        f"grid: {len(pairs)} paired runs (resnet18 perceptron, Adam x 7 + SGD x 6 LRs), "
        f"{args.epochs} epochs, demo data {meta['n']}"
    )
    print(f"naive grid (feature_bank=off): {naive_s:8.1f} s")
    print(
        f"banked grid (feature_bank=auto): {bank_s:8.1f} s  (extraction {meta['seconds']:.1f} s of it, "
        f"{meta['views']} views, {meta['precision']})"
    )
    print(f"speed-up: {naive_s / bank_s:.1f}x")
    print(f"mean |test acc difference| over paired runs: {sum(diffs) / len(diffs):.2f} points (max {max(diffs):.2f})")
    print(
        f"extraction throughput: {meta['img_per_s']:.1f} img/s ({meta['crops']} crops, batches of "
        f"{batch}); plain {'bf16' if uses_bf16(device, 'auto') else 'fp32'}/channels_last ResNet18 inference, same images and batch, "
        f"just before / after the banked sweep: {before:.1f} / {after:.1f} img/s, mean {plain:.1f} "
        f"({100 * meta['img_per_s'] / plain:.1f}%)"
    )
    if rounds:
        ratios = sorted(e / p for e, p in rounds)
        median = statistics.median(ratios)
        print(
            f"in this process, {len(rounds)} rounds of extraction then plain inference: extraction "
            + " / ".join(f"{e:.1f}" for e, _ in rounds)
            + " img/s, plain "
            + " / ".join(f"{p:.1f}" for _, p in rounds)
            + " img/s (each the mean of the plain figures "
            f"around it): median {100 * median:.1f}% "
            f"(min {100 * ratios[0]:.1f}%, max {100 * ratios[-1]:.1f}%)"
        )
    for k in pairs:
        print(f"  {k:34s} naive {100 * naive_acc[k]:6.2f}%  bank {100 * bank_acc[k]:6.2f}%")


if __name__ == "__main__":
    main()
