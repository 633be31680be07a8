"""The frozen-backbone feature bank: backbone features computed once, shared by every run.

With ``backbone.freeze=all`` the features of a given crop never change, so instead of re-running the
backbone over every image at every epoch of every run, the bank stores, per training image, ``V``
random crops (views 0..V-1 of ``crops.crop_offset``, seeded by ``trainer.crop_seed``) and one centre
crop per valid/test image. Training epoch ``e`` uses view ``(e - 1) mod V`` of each image, in the
order ``crops.shuffled(run seed, e)``: the naive loop draws its crops and order from the same
functions, so ``V >= max_epochs`` reproduces it crop for crop, and a small ``V`` (default 8)
extracts less and reuses crops after epoch V.

Stored fp16 (fp32 if features exceed fp16's range) and memory-mapped under ``<cache_dir>/features/<key>/``, keyed by everything that
determines the features (backbone, weights source and checksum, data files with sizes and mtimes,
crop and normalisation, V, crop seed). A file lock makes concurrent jobs build it once.

``meta.json`` records every file's size and SHA-256 (and its own checksum); a bank is verified when
a process first opens it, and a damaged one (changed bytes, truncated, a file missing or extra,
meta.json unreadable) is reported in one warning line and rebuilt, never read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet_sweep.config import checks
from resnet_sweep.core import faults, sealed
from resnet_sweep.data import crops
from resnet_sweep.training.extraction import extract, extract_batch

log = logging.getLogger(__name__)

BANK_VERSION = 4  # 2: fp32 fallback when features exceed fp16; 3: crops shared with the naive loop, resize;
# 4: meta.json records each file's size and checksum


def wanted(cfg) -> bool:
    """Automatic when the whole backbone is frozen; ``trainer.feature_bank=off`` disables it."""
    return checks.feature_bank(cfg.trainer) == "auto" and str(cfg.backbone.freeze) == "all"


@dataclass
class Bank:
    key: str
    path: Path
    views: int
    meta: dict

    def array(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.npy", mmap_mode="r")

    def labels(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.load(self.path / f"{split}_labels.npy"))


class BankLoader:
    """Batches of (features, labels) from the bank. The train loader serves view ``view_of(epoch) mod V``
    in the order ``crops.epoch_order(labels, seed, epoch, sampler)``, as the naive loop does; eval
    loaders serve the centre crop in order."""

    def __init__(self, bank: Bank, split: str, batch_size: int, shuffle: bool, seed: int, sampler: str = "shuffle"):
        self.features = bank.array(split)
        self.targets = bank.labels(split)
        self.views = bank.views if split == "train" else 1
        self.batch_size, self.shuffle, self.seed, self.sampler = batch_size, shuffle, seed, sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.targets) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        feats = self.features[crops.view_of(self.epoch) % self.views] if self.features.ndim == 3 else self.features
        n = len(self.targets)
        order = crops.epoch_order(self.targets, self.seed, self.epoch, self.sampler) if self.shuffle else np.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            x = torch.from_numpy(np.asarray(feats[np.sort(idx)], dtype=np.float32))
            # keep the shuffled order: rows were read sorted (fast on a memmap), put them back
            inverse = np.argsort(np.argsort(idx))
            yield x[inverse], self.targets[idx]


class HeadOnly(nn.Module):
    """The classifier's head on bank features: the same head object, so it trains the real model."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(-1)


def samples_of(splits) -> tuple[dict[str, list[Path]], dict[str, list[int]]]:
    """The files and labels of each split, in the loaders' order: what the bank extracts."""
    samples = {s: getattr(splits, s).dataset.samples for s in checks.SPLITS}
    return (
        {s: [p for p, _ in samples[s]] for s in checks.SPLITS},  # already Paths (Path(p): a new object a file)
        {s: [y for _, y in samples[s]] for s in checks.SPLITS},
    )


def key_of(cfg, built, files: dict[str, list[Path]], splits) -> str:
    spec = {
        "version": BANK_VERSION,
        "backbone": str(cfg.backbone.name),
        "weights_source": built.weights_source,
        "frozen_checksum": built.frozen_checksum,
        "files": {s: splits.fingerprint(s) for s in checks.SPLITS},  # the sweep's listing: nothing stat-ed again
        "crop": splits.crop_size,
        "resize": splits.resize,
        "mean": list(splits.mean),
        "std": list(splits.std),
        "views": int(cfg.trainer.bank_views),
        "crop_seed": splits.crop_seed,
    }
    if splits.augment:  # (absent when empty: the keys of banks without augmentation stay as they were)
        spec["augment"] = list(splits.augment)
    return sealed.json_key(spec, 16)


def _bank_fields(meta: dict) -> None:
    int(meta["views"]), int(meta["dim"])


def check(path: Path) -> tuple[dict | None, str | None]:
    """``(meta, None)`` when the bank in ``path`` is whole, ``(None, None)`` when there is none,
    ``(None, what is wrong)`` when it is damaged (``sealed.check``).

    Hashing a 50,000-image, 8-view ResNet18 bank (430 MB) takes 0.3 s (0.6 s on a busy 2-core
    machine), a few percent of a job that trains a head on it, and it reads the pages the job then
    reads anyway. It is done once per process and bank, and again only when a file's size, mtime
    or inode changed since."""
    return sealed.check(path, _bank_fields)


def get(cfg, built, splits, device: torch.device) -> Bank:
    """The bank for this job: reused when it exists and is whole, else built (or rebuilt, with one
    warning line, when damaged) once under a file lock."""
    views, batch = int(cfg.trainer.bank_views), extract_batch(cfg, device)
    files, labels = samples_of(splits)
    key = key_of(cfg, built, files, splits)
    root = Path(os.path.expanduser(str(cfg.data.cache_dir))) / "features"
    path = root / key

    def make(tmp: Path) -> dict:
        log.info("building the feature bank %s (%d views per training image)", key, views)
        stats = extract(
            built.model.backbone,
            files,
            labels,
            splits.crop_size,
            splits.mean,
            splits.std,
            views,
            splits.crop_seed,
            device,
            tmp,
            batch_size=batch,
            resize=splits.resize,
            store=splits.store.get() if splits.store is not None else None,
            augment=splits.augment,
        )
        log.info(
            "feature bank %s: %d crops in %.1f s (%.1f img/s, %s)",
            key,
            stats["crops"],
            stats["seconds"],
            stats["img_per_s"],
            stats["precision"],
        )
        return {
            "key": key,
            "views": views,
            "backbone": str(cfg.backbone.name),
            "weights_source": built.weights_source,
            "n": {s: len(files[s]) for s in files},
            **stats,
        }

    with faults.writing(root):
        meta = sealed.build_once(root, key, make, what="feature bank", log=log, validate=_bank_fields)
    return Bank(key=key, path=path, views=int(meta["views"]), meta=meta)


def splits_from(bank: Bank, splits, batch_size: int, seed: int):
    """Splits-like object whose loaders serve bank features."""
    from dataclasses import replace

    return replace(
        splits,
        train=BankLoader(bank, "train", batch_size, shuffle=True, seed=seed, sampler=splits.sampler),
        valid=BankLoader(bank, "valid", batch_size, shuffle=False, seed=seed),
        test=BankLoader(bank, "test", batch_size, shuffle=False, seed=seed),
    )
