"""CUDA check of the training paths, without MLflow: run it on a GPU machine (under 5 minutes).

    python benchmarks/cuda_check.py [--tiles-per-slide 25]
    python benchmarks/cuda_check.py --cpu --smoke     # the same script, tiny, on the CPU (the test suite)

0. the data path (benchmarks/bench_data_path.py on the GPU): pipeline-only crops/s from the decoded tile
   store and from PIL; fine-tuning from the store as a percentage of the synthetic-batch step
   (target >= 70%); the bank's extraction as a percentage of plain bf16 inference (target >= 80%);

1. the feature bank built on the GPU (AMP bf16 after the cosine check), its throughput, and its
   features against the same crops through the backbone on the CPU in fp32;
2. a head trained on the bank on the GPU (5 epochs) and its test metrics;
3. the naive loop on the GPU with part of the backbone training (freeze=last_n, bf16 autocast,
   DataLoader workers with pinned memory), 2 epochs, images/s;
4. plain bf16/channels_last inference throughput of ResNet18 and ResNet50 for comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from resnet_sweep.config import checks  # noqa: E402
from resnet_sweep.data import loading  # noqa: E402
from resnet_sweep.training import engine, features, hardware, models  # noqa: E402


def config(cache: str, tiles: int, *more: str, workers: int = 8):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "backbone.weights=none",
                f"data.cache_dir={cache}",
                f"data.tiles_per_slide={tiles}",
                f"trainer.num_workers={workers}",
                *more,
            ],
        )


def fit(model, inputs, cfg, built, device):
    start = time.perf_counter()
    history = engine.fit(
        model,
        inputs,
        cfg.optimizer,
        cfg.trainer,
        lambda e, m: print(f"    epoch {e}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items())),
        cfg.objective,
        state_fn=lambda: models.trainable_state(built.model),
        device=device,
        scheduler_cfg=cfg.get("scheduler"),
    )
    return history, time.perf_counter() - start


def plain(name: str, device, batch=256, batches=20, crop=224) -> float:
    from torchvision import models as tvm

    model = tvm.get_model(name).eval().to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), hardware.autocast(device, "auto"):
        for _ in range(3):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(batches):
            model(x).float().cpu()
        sync()
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles-per-slide", type=int, default=25)
    parser.add_argument("--plain-batches", type=int, default=20)
    parser.add_argument("--plain-batch", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="dry run of this script on the CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for the test suite")
    args = parser.parse_args()
    if args.smoke:
        args.tiles_per_slide, args.plain_batches, args.plain_batch = 2, 1, 4
    crop_px = 64 if args.smoke else 224  # smoke: the same code on a twelfth of the pixels
    device = hardware.resolve_device("cpu" if args.cpu else "auto")
    if not args.cpu:
        assert device.type == "cuda", "no CUDA device"
        print(
            f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, device auto -> {device}, "
            f"bf16 supported: {torch.cuda.is_bf16_supported()}"
        )
    cache = tempfile.mkdtemp(prefix="rs-cuda-")

    # 0. the data path: store against PIL, beside the model's own limit
    import bench_data_path

    ratios = bench_data_path.main(
        ["--device", str(device), "--rounds", "1" if args.smoke else "2"]
        + (["--smoke"] if args.smoke else ["--tiles-per-slide", str(args.tiles_per_slide)])
    )
    print(
        f"0. data path: fine-tuning {100 * ratios['finetune_store']:.1f}% of the synthetic step (target >= 70% on "
        f"a GPU), extraction {100 * ratios['extract_ratio']:.1f}% of plain inference (target >= 80%)"
    )

    # 1. the bank on the GPU
    workers = 0 if args.smoke else 8  # (on the CPU, worker processes would only cost their start)
    cfg = config(cache, args.tiles_per_slide, "trainer.max_epochs=5", "optimizer.lr=1e-3", workers=workers)
    splits = loading.load_splits(cfg.data, cfg.trainer, crop_size=crop_px, seed=0, device=device)
    print(
        f"demo data: {[len(getattr(splits, s).dataset) for s in checks.SPLITS]} train/valid/test tiles; "
        f"loaders: {type(splits.train.loader()).__name__} (tile store {'on' if splits.store.get() else 'off'})"
    )
    built = models.build_classifier(cfg.backbone, cfg.head)
    start = time.perf_counter()
    bank = features.get(cfg, built, splits, device)
    meta = bank.meta
    print(
        f"1. bank: {meta['crops']} crops in {meta['seconds']:.2f} s = {meta['img_per_s']:.0f} img/s "
        f"({meta['precision']}, {meta['device']}, stored {meta['dtype']}); get() {time.perf_counter() - start:.1f} s"
    )
    backbone_cpu = models.build_classifier(cfg.backbone, cfg.head).model.backbone.eval()
    cos = []
    for epoch in (1, 2, 3):
        splits.train.set_epoch(epoch)
        crop, _ = splits.train.dataset[7]
        with torch.inference_mode():
            ref = backbone_cpu(crop.unsqueeze(0)).float()[0]
        got = torch.from_numpy(np.asarray(bank.array("train")[epoch - 1, 7], dtype=np.float32))
        cos.append(torch.nn.functional.cosine_similarity(ref, got, dim=0).item())
    print(
        f"   {meta['device']}-{meta['precision']} bank vs CPU-fp32 backbone on the naive loop's crops (epochs 1-3): cosine "
        f"{', '.join(f'{c:.5f}' for c in cos)}"
    )

    # 2. the head on the bank, on the GPU
    head_model = features.HeadOnly(built.model.head)
    inputs = features.splits_from(bank, splits, int(cfg.trainer.batch_size), int(cfg.seed))
    history, seconds = fit(head_model, inputs, cfg, built, device)
    built.model.load_state_dict(history.best_state, strict=False)
    test = engine.evaluate(head_model, inputs.test, device, cfg.trainer.precision)
    print(
        f"2. head on the bank: {len(history.epochs) - 1} epochs in {seconds:.2f} s, best epoch "
        f"{history.best_epoch}, test acc {100 * test['test/acc']:.2f}%, loss {test['test/loss']:.3f}"
    )

    # 3. naive loop, part of the backbone training
    cfg3 = config(
        cache,
        args.tiles_per_slide,
        "backbone.freeze=last_n",
        "backbone.unfreeze=2",
        "trainer.max_epochs=2",
        "optimizer.lr=1e-3",
        "optimizer.backbone_lr_scale=0.1",
        "scheduler=cosine",
        workers=workers,
    )
    built3 = models.build_classifier(cfg3.backbone, cfg3.head)
    history, seconds = fit(built3.model, splits, cfg3, built3, device)
    n = 3 * len(splits.train.dataset) + 3 * len(splits.valid.dataset)
    test = engine.evaluate(built3.model, splits.test, device, cfg3.trainer.precision)
    print(
        f"3. fine-tuning loop, freeze=last_n unfreeze=2 ({built3.trainable_params:,} trainable), "
        f"{'bf16 autocast' if hardware.uses_bf16(device, cfg3.trainer.precision) else 'fp32'}, "
        f"from the tile store: {seconds:.1f} s for epochs 0-2 ({n / seconds:.0f} img/s), test acc "
        f"{100 * test['test/acc']:.2f}%"
    )

    # 4. plain inference
    for name in ("resnet18", "resnet50"):
        print(
            f"4. plain {name} {'bf16' if hardware.uses_bf16(device, 'auto') else 'fp32'} channels_last inference, batch {args.plain_batch}: "
            f"{plain(name, device, batch=args.plain_batch, batches=args.plain_batches, crop=crop_px):.0f} img/s"
        )
    print("CUDA CHECK OK", flush=True)


if __name__ == "__main__":
    main()
    # a process that does not end within 30 s of its work prints every thread's stack and exits
    import faulthandler

    faulthandler.dump_traceback_later(30, exit=True)
