"""The normalisation of a data set: ImageNet's, or the training split's own per-channel mean and
std, streamed over its images and cached by their fingerprint."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from torchvision import transforms

from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.data.image_folder import fingerprint
from resnet_sweep.data.images import load_rgb

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(paths: list[Path]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of the images, streamed (one image in memory at a
    time; running sums in float64), so any number of files. `paths` may be any iterable."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    to_tensor = transforms.ToTensor()
    for path in paths:
        try:
            image = load_rgb(path)
        except Exception as e:
            why = first_line(e)
            raise UserError(f"{path}: cannot be read as an image ({why}); fix or remove it") from None
        x = to_tensor(image).to(torch.float64).flatten(1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def dataset_stats(
    train_files: list[Path], cache_dir, *, stamps: dict | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the training split, cached by the files' fingerprint (from ``stamps`` if given)."""
    cache = Path(os.path.expanduser(str(cache_dir))) / "stats"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{fingerprint(train_files, stamps)}.json"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            stats = json.loads(path.read_text())
            return tuple(stats["mean"]), tuple(stats["std"])
        log.info("Computing per-channel mean/std of %d training images (cached)", len(train_files))
        mean, std = channel_stats(train_files)
        path.write_text(json.dumps({"mean": mean, "std": std, "n_images": len(train_files)}))
    return mean, std
