"""The data path (issue 14): decoded tile store against PIL decoding, beside the model's own limit.

    .venv/bin/python benchmarks/bench_data_path.py [--tiles-per-slide 50] [--rounds 3] [--device auto]
    .venv/bin/python benchmarks/bench_data_path.py --smoke      # seconds, tiny, CPU: what the test suite runs

Printed, in one run, on the demo data (250x250 PNG tiles, 224-px crops):
1. pipeline only (no model): training crops per second delivered ready for the model (cropped,
   normalised, channels_last, on the device) and per CPU-second of this process (torch and the
   store's gather thread included), from PIL decoding (``trainer.num_workers=0``) and from the store;
2. fine-tuning (``backbone.freeze=none``, ResNet18, batch 32, bf16 where the hardware has it, SGD):
   training images/s reading from the store and from PIL, as a percentage of the same training step
   on one synthetic batch already on the device (the limit: no data path at all);
3. the feature bank's extraction from the store, as a percentage of plain inference (the same
   frozen backbone, batch, precision and features copied back) on a pre-made device batch, measured
   right before and right after each extraction;
4. the store's build: images/s with every core, size on disk.
Each ratio is measured in interleaved rounds (this 2-core VM drifts by up to 10% within a minute):
the two sides of a ratio alternate, and the median over rounds is printed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resnet_sweep.config import checks  # noqa: E402
from resnet_sweep.data import (  # noqa: E402
    batches,
    cores,
    loading,
)
from resnet_sweep.training import engine, extraction, features, hardware, models, optimizers  # noqa: E402


def config(cache: str, tiles_per_slide: int, *more: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "backbone.weights=none",
                f"data.cache_dir={cache}",
                f"data.tiles_per_slide={tiles_per_slide}",
                "trainer.num_workers=0",
                *more,
            ],
        )


class Limited:
    """The first ``n`` batches of a loader (what engine.train_one_epoch iterates)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


class Synthetic:
    """One batch already on the device, served ``n`` times: a data path that costs nothing."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int):
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.repeat((self.x, self.y), self.n)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def pipeline(loader, crops: int, device) -> tuple[float, float]:
    """(crops/s, crops per CPU-second) of iterating ``loader`` with nothing consuming its batches."""

    def drain():
        done = 0
        for epoch in itertools.count(1):
            loader.set_epoch(epoch)
            for x, _ in loader:
                done += len(x)
                if done >= crops:
                    return

    wall, cpu = timed(drain, device)
    return crops / wall, crops / max(cpu, 1e-9)


def train_rate(model, loader, optimizer, device, precision: str, n: int) -> float:
    """Training images/s over ``n`` batches through engine.train_one_epoch (the product's own step)."""
    wall, _ = timed(
        lambda: engine.train_one_epoch(
            model, Limited(loader, n), device=device, precision=precision, epoch=1, optimizer=optimizer
        ),
        device,
    )
    return n * loader_batch(loader) / wall


def loader_batch(loader) -> int:
    return loader.batch_size if hasattr(loader, "batch_size") else len(loader.x)


def plain_rate(backbone, x: torch.Tensor, crops: int, device, precision: str) -> float:
    """Frozen-backbone inference on a pre-made device batch, features copied back, as extraction does."""

    def run():
        with torch.inference_mode(), hardware.autocast(device, precision):
            done = 0
            while done < crops:
                n = min(len(x), crops - done)
                backbone(x[:n]).float().cpu()
                done += n

    wall, _ = timed(run, device)
    return crops / wall


def median_ratio(pairs) -> tuple[float, float, float]:
    ratios = [a / b for a, b in pairs]
    return statistics.median(ratios), min(ratios), max(ratios)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles-per-slide", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="the fine-tuning and pipeline batch")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick, for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiles_per_slide, args.rounds, args.train_batches, args.batch = 2, 1, 1, 8
    crop = 64 if args.smoke else 224  # smoke: the same code on a twelfth of the pixels
    device = hardware.resolve_device(args.device)
    hardware.keep_freed_memory()
    precision = "bf16" if hardware.uses_bf16(device, "auto") else "32"
    cache = tempfile.mkdtemp(prefix="rs-datapath-")
    cfg = config(cache, args.tiles_per_slide, "backbone.freeze=none", f"trainer.batch_size={args.batch}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} torch threads, precision {precision}, load average {os.getloadavg()[0]:.2f}"
    )

    # 4 first: the store every other measurement reads
    store_splits = loading.load_splits(cfg.data, cfg.trainer, crop_size=crop, seed=0, crop_seed=0, device=device)
    files = {s: [p for p, _ in getattr(store_splits, s).dataset.samples] for s in checks.SPLITS}
    n_images = sum(len(v) for v in files.values())
    for path in (p for s in files for p in files[s]):  # PNGs in the page cache, as after a first epoch
        path.read_bytes()
    wall, _ = timed(lambda: store_splits.store.get(), device)
    store = store_splits.store.get()
    size = sum(f.stat().st_size for f in store.path.iterdir())
    out = {"build_img_per_s": n_images / wall, "store_mb": size / 1e6}
    print(
        f"data: demo, {', '.join(f'{len(files[s])} {s}' for s in checks.SPLITS)} tiles; store built in {wall:.2f} s "
        f"({n_images / wall:.0f} img/s with {cores.available()} threads, decode + write + sha256), "
        f"{size / 1e6:.1f} MB on disk"
    )

    # 1. pipeline only, one torch thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pil_loader, store_loader = store_splits.train.pil, store_splits.train.loader()
    assert isinstance(store_loader, batches.StoreLoader)
    crops = len(files["train"])
    pil_rates, store_rates = [], []
    for _ in range(args.rounds):
        pil_rates.append(pipeline(pil_loader, crops, device))
        store_rates.append(pipeline(store_loader, 8 * crops, device))
    torch.set_num_threads(threads)
    pil_wall = statistics.median(r[0] for r in pil_rates)
    pil_cpu = statistics.median(r[1] for r in pil_rates)
    st_wall = statistics.median(r[0] for r in store_rates)
    st_cpu = statistics.median(r[1] for r in store_rates)
    out.update(pipeline_pil=pil_cpu, pipeline_store=st_cpu)
    print(
        f"1. pipeline only (crop {crop}, batch {args.batch}, normalised, channels_last, on {device}): PIL decode "
        f"{pil_wall:.0f} crops/s ({pil_cpu:.0f} per CPU-second); store {st_wall:.0f} crops/s ({st_cpu:.0f} per "
        f"CPU-second): {st_cpu / pil_cpu:.1f}x per core"
    )

    # 2. fine-tuning against the synthetic-batch step
    built = models.build_classifier(cfg.backbone, cfg.head, seed=0)
    model = built.model.to(device).to(memory_format=torch.channels_last)
    optimizer = optimizers.make_optimizer(cfg.optimizer, model)
    x, y = next(iter(store_loader))
    synthetic = Synthetic(x.clone(), y.to(device), args.train_batches)
    train_rate(model, synthetic, optimizer, device, precision, 1)  # warm-up
    pairs_store, pairs_pil = [], []
    for _ in range(args.rounds):
        limit = train_rate(model, synthetic, optimizer, device, precision, args.train_batches)
        from_store = train_rate(model, store_loader, optimizer, device, precision, args.train_batches)
        limit2 = train_rate(model, synthetic, optimizer, device, precision, args.train_batches)
        from_pil = train_rate(model, pil_loader, optimizer, device, precision, args.train_batches)
        pairs_store.append((from_store, (limit + limit2) / 2))
        pairs_pil.append((from_pil, limit2))
    ft_store, ft_pil = median_ratio(pairs_store), median_ratio(pairs_pil)
    out.update(finetune_store=ft_store[0], finetune_pil=ft_pil[0])
    print(
        f"2. fine-tuning resnet18 (freeze=none, batch {args.batch}, precision {precision}): synthetic-batch step "
        f"{statistics.median(p[1] for p in pairs_store):.1f} img/s; store {statistics.median(p[0] for p in pairs_store):.1f} "
        f"img/s = {100 * ft_store[0]:.1f}% (rounds {100 * ft_store[1]:.1f}-{100 * ft_store[2]:.1f}%); PIL "
        f"{statistics.median(p[0] for p in pairs_pil):.1f} img/s = {100 * ft_pil[0]:.1f}%"
    )

    # 3. bank extraction from the store against plain inference on a pre-made device batch
    bank_cfg = config(cache, args.tiles_per_slide)
    backbone = models.build_classifier(bank_cfg.backbone, bank_cfg.head, seed=0).model.backbone
    backbone = backbone.to(device).eval().to(memory_format=torch.channels_last)
    labels = {s: [lab for _, lab in getattr(store_splits, s).dataset.samples] for s in checks.SPLITS}
    views = 2
    bank_crops = views * len(files["train"]) + len(files["valid"]) + len(files["test"])
    # the batch the product uses on this device; on a GPU the CPU's 64 beside it
    for batch in sorted({extraction.default_extract_batch(device), checks.EXTRACT_BATCH["cpu"]}, reverse=True):
        pre = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
        plain_rate(backbone, pre, batch, device, precision)  # warm-up
        pairs = []
        bank_precision = precision
        for _ in range(args.rounds):  # plain inference right before and right after each extraction
            before = plain_rate(backbone, pre, bank_crops, device, bank_precision)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                stats = features.extract(
                    backbone,
                    files,
                    labels,
                    crop,
                    store_splits.mean,
                    store_splits.std,
                    views,
                    0,
                    device,
                    Path(tmp),
                    batch_size=batch,
                    store=store,
                )
            bank_precision = stats["precision"]
            after = plain_rate(backbone, pre, bank_crops, device, bank_precision)
            pairs.append((stats["img_per_s"], (before + after) / 2))
        ex = median_ratio(pairs)
        if batch == extraction.default_extract_batch(device):
            out.update(extract_ratio=ex[0])
        print(
            f"3. feature bank extraction from the store ({bank_crops} crops, batch {batch}, precision {stats['precision']}): "
            f"{statistics.median(p[0] for p in pairs):.1f} img/s; plain inference on a device batch "
            f"{statistics.median(p[1] for p in pairs):.1f} img/s: {100 * ex[0]:.1f}% (rounds {100 * ex[1]:.1f}-"
            f"{100 * ex[2]:.1f}%)"
        )
    print(
        f"4. store build: {out['build_img_per_s']:.0f} img/s with {cores.available()} threads, {out['store_mb']:.1f} MB"
    )
    return out


if __name__ == "__main__":
    main()
