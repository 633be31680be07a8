"""Validated ImageFolder splits -> DataLoaders.

Layout: ``root/{train,valid,test}/{class_a,class_b}/*``. Every problem with the tree is reported
as one line naming the path, before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from . import demo_data
from .errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Splits:
    train: DataLoader
    valid: DataLoader
    test: DataLoader
    classes: list[str]
    root: Path
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_size: int

    def eval_transform(self) -> transforms.Compose:
        return eval_transform(self.crop_size, self.mean, self.std)


def resolve_root(data_cfg) -> Path:
    """The ImageFolder root of ``data``: generated for the demo, checked for a user's folder."""
    if data_cfg.kind == "demo":
        return demo_data.ensure(data_cfg)
    root = Path(os.path.expanduser(str(data_cfg.root)))
    if not root.is_dir():
        raise UserError(
            f"data.root={data_cfg.root}: no such directory; point it at a folder holding "
            "train/, valid/ and test/, each with one folder per class"
        )
    return root


def is_image(path: Path) -> bool:
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def scan_tree(root: Path, crop_size: int) -> tuple[list[str], dict[str, list[Path]]]:
    """Check the tree and return (classes, files per split). Raises UserError on the first
    problem, naming the path and what to do."""
    where = f"data.root={root}"
    classes_by_split: dict[str, list[str]] = {}
    files: dict[str, list[Path]] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise UserError(
                f"{where}: missing split folder '{split}' ({folder}); expected train/, valid/ and "
                "test/, each with one folder per class"
            )
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) != 2:
            shown = ", ".join(f"'{c}'" for c in classes) or "none"
            raise UserError(
                f"{where}: split '{split}' has {len(classes)} class folder"
                f"{'' if len(classes) == 1 else 's'} ({shown}); expected exactly 2"
            )
        classes_by_split[split] = classes
        files[split] = []
        for cls in classes:
            images = sorted(p for p in (folder / cls).rglob("*") if is_image(p))
            if not images:
                raise UserError(
                    f"{where}: {folder / cls} has no images (looked for "
                    f"{' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
                )
            files[split].extend(images)
    train_classes = classes_by_split["train"]
    for split in ("valid", "test"):
        if classes_by_split[split] != train_classes:
            raise UserError(
                f"{where}: class folders differ between splits: train has {train_classes}, "
                f"{split} has {classes_by_split[split]}; use the same two names in every split"
            )
    for split in SPLITS:
        for path in files[split]:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Exception as e:  # corrupt or not an image
                raise UserError(f"{path}: cannot be read as an image ({e}); fix or remove it") from None
            if min(w, h) < crop_size:
                raise UserError(
                    f"{path}: image is {w}x{h}, smaller than the {crop_size}x{crop_size} crop; "
                    "use larger tiles or a backbone with a smaller backbone.crop_size"
                )
    return train_classes, files


def train_transform(crop: int, mean, std) -> transforms.Compose:
    return transforms.Compose(
        [transforms.RandomCrop(crop), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


def eval_transform(crop: int, mean, std) -> transforms.Compose:
    return transforms.Compose(
        [transforms.CenterCrop(crop), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


def load_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def channel_stats(paths: list[Path]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of the images, streamed (any number of files)."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    to_tensor = transforms.ToTensor()
    for path in paths:
        x = to_tensor(load_rgb(path)).to(torch.float64).flatten(1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def fingerprint(paths: list[Path]) -> str:
    """Identifies a set of files by path, size and modification time."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def dataset_stats(train_files: list[Path], cache_dir) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the training split, cached by the files' fingerprint."""
    cache = Path(os.path.expanduser(str(cache_dir))) / "stats"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{fingerprint(train_files)}.json"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            stats = json.loads(path.read_text())
            return tuple(stats["mean"]), tuple(stats["std"])
        log.info("Computing per-channel mean/std of %d training images (cached)", len(train_files))
        mean, std = channel_stats(train_files)
        path.write_text(json.dumps({"mean": mean, "std": std, "n_images": len(train_files)}))
    return mean, std


def build(data_cfg, trainer_cfg, crop_size: int = 224, seed: int = 0) -> Splits:
    root = resolve_root(data_cfg)
    classes, files = scan_tree(root, crop_size)
    if data_cfg.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif data_cfg.normalize == "dataset":
        mean, std = dataset_stats(files["train"], data_cfg.cache_dir)
    else:
        raise UserError(f"data.normalize={data_cfg.normalize}: choose imagenet or dataset")

    def loader(split: str, transform, shuffle: bool) -> DataLoader:
        ds = datasets.ImageFolder(str(root / split), transform=transform, loader=load_rgb,
                                  is_valid_file=lambda p: is_image(Path(p)))
        generator = torch.Generator().manual_seed(seed)  # data order and crops follow the seed
        workers = int(trainer_cfg.num_workers)
        return DataLoader(
            ds,
            batch_size=int(trainer_cfg.batch_size),
            shuffle=shuffle,
            num_workers=workers,
            generator=generator,
            # not persistent: workers are re-seeded from `generator` every epoch, so a resumed
            # job draws the same crops as an uninterrupted one
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    return Splits(
        train=loader("train", train_transform(crop_size, mean, std), shuffle=True),
        valid=loader("valid", eval_transform(crop_size, mean, std), shuffle=False),
        test=loader("test", eval_transform(crop_size, mean, std), shuffle=False),
        classes=classes,
        root=root,
        mean=tuple(mean),
        std=tuple(std),
        crop_size=crop_size,
    )
