"""Validated ImageFolder splits -> batches: the data set a job trains on (the demo's, generated once,
or the user's folder, checked whole by ``images.scan_tree``), its normalisation, and one loader per
split, from the decoded tile store where there is one, else decoded by PIL (``crops``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resnet_sweep.config.checks import SPLITS, check_augment, check_root, check_sampler
from resnet_sweep.core import faults
from resnet_sweep.core.errors import UserError
from resnet_sweep.data import demo_data
from resnet_sweep.data.crops import EpochShuffle, Loader, Tiles
from resnet_sweep.data.grouping import file_groups
from resnet_sweep.data.image_folder import Listing, list_tree, split_fingerprint
from resnet_sweep.data.loaders import ImageLoader, TileStore, worker_context
from resnet_sweep.data.normalisation import IMAGENET_MEAN, IMAGENET_STD, dataset_stats
from resnet_sweep.data.shared_tree import checked_tree, record_of, remembered

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: ImageLoader
    valid: ImageLoader
    test: ImageLoader
    classes: list[str]
    root: Path
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_size: int
    skipped: list = field(default_factory=list)  # [(path, reason)] left out by data.on_bad_image=skip
    resize: int | None = None  # shorter side resized to this before cropping (None: tiles as they are)
    crop_seed: int = 0
    augment: tuple = ()  # data.augment: flips / quarter turns of the training crops
    sampler: str = "shuffle"  # data.sampler: shuffle | balanced (crops.epoch_order)
    groups: dict[str, list[str]] | None = None  # data.group: each split's file groups, in loader order
    group_aggregate: str = "mean"  # data.group_aggregate: mean | majority
    store: TileStore | None = None
    listing: Listing | None = None  # the tree as listed (once per sweep): its files' stamps
    files: dict[str, list[Path]] | None = None  # each split's files, in loader order

    def fingerprint(self, split: str) -> str:
        """``image_folder.fingerprint`` of the split's files (in its loader), from the stamps taken when the
        tree was listed, computed once per sweep when no file was left out: what a cache keyed by
        the files uses (the feature bank), without stat-ing every file in every job."""
        return split_fingerprint(self.listing, self.files, split)


def class_counts(splits: Splits) -> dict[str, list[int]]:
    """Images per class of each split, in class-folder order: ``{"train": [150, 10], ...}``."""
    counts = {}
    for split in SPLITS:
        labels = [y for _, y in getattr(splits, split).dataset.samples]
        counts[split] = [labels.count(i) for i in range(len(splits.classes))]
    return counts


def resolve_root(data_cfg) -> Path:
    """The ImageFolder root of ``data``: generated for the demo, checked for a user's folder."""
    return check_root(data_cfg) or demo_data.ensure(data_cfg)


def tree_files(root: Path) -> list[Path]:
    """Every image file of the three splits' class folders (as training reads them), unchecked."""
    return [p for split in SPLITS for p in list_tree(root).files[split]]


def data_fingerprint(data_cfg, share: Path | None = None) -> str:
    """What identifies the data a job trains on: the root's files (paths, sizes, mtimes). Part of
    the resume key, the auto-named Optuna study and the feature bank's key, so adding, removing or
    changing an image is a different job, never a reuse of the old data's results. In a sweep (its
    ``share`` folder), from the tree its pre-flight (or first job) listed (``checked_tree``): the
    files are stat-ed once per sweep, not once per job."""
    root = resolve_root(data_cfg)
    tree = remembered(record_of(share, root)) if share is not None else None
    return (tree.listing if tree is not None else list_tree(root)).fingerprint


def job_splits(cfg, device: torch.device | None = None, share: Path | None = None) -> Splits:
    """The splits the job of config ``cfg`` trains on: its data at its backbone's crop (and resize),
    shuffled by its seed, cropped by its crop seed (``share``: its sweep's shared data folder)."""
    return load_splits(
        cfg.data,
        cfg.trainer,
        crop_size=int(cfg.backbone.crop_size),
        seed=int(cfg.seed),
        resize=cfg.backbone.resize,
        crop_seed=cfg.trainer.crop_seed,
        device=device,
        share=share,
    )


def load_splits(
    data_cfg,
    trainer_cfg,
    crop_size: int = 224,
    seed: int = 0,
    resize: int | None = None,
    crop_seed: int = 0,
    device: torch.device | None = None,
    share: Path | None = None,
) -> Splits:
    """The three splits of ``data``, checked whole (one line naming the path for any problem), with
    one loader each: training crops from ``crop_seed`` and ``seed`` (order), evaluation centre crops."""
    root = resolve_root(data_cfg)
    augment = check_augment(data_cfg.augment)
    sampler = check_sampler(data_cfg.sampler)
    # with a resize, any image can be cropped; without one, images must be at least the crop
    smallest = crop_size if not resize else 1
    on_bad_image = str(data_cfg.on_bad_image)
    tree = checked_tree(data_cfg, root, crop_size=smallest, resize=resize, share=share)
    listing = tree.listing
    classes = listing.classes
    files, labels, skipped = tree.usable(smallest, on_bad_image, data_cfg.cache_dir)
    groups = file_groups(root, files, data_cfg.group) if data_cfg.group is not None else None
    if data_cfg.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif data_cfg.normalize == "dataset":
        mean, std = dataset_stats(files["train"], data_cfg.cache_dir, stamps=listing.stamps)
    else:
        raise UserError(f"data.normalize={data_cfg.normalize}: choose imagenet or dataset")
    device = device or torch.device("cpu")
    store = TileStore(data_cfg, files, resize, device, listing=listing)

    def loader(split: str, train: bool) -> ImageLoader:
        samples = tree.samples(files, labels, split)
        ds = Tiles(samples, crop_size, mean, std, resize, crop_seed if train else None, augment if train else ())
        workers = int(trainer_cfg.num_workers)
        pil = Loader(
            ds,
            batch_size=int(trainer_cfg.batch_size),
            sampler=EpochShuffle([y for _, y in samples], seed, sampler) if train else None,
            num_workers=workers,
            # not persistent: each epoch's workers get the dataset with that epoch's crops
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context=worker_context() if workers > 0 else None,
            worker_init_fn=faults.ignore_in_worker if workers > 0 else None,
        )

        def from_store():
            images = store.images(split)
            if images is None:
                return None
            from resnet_sweep.data.batches import StoreLoader

            return StoreLoader(
                images,
                [y for _, y in samples],
                crop_size,
                mean,
                std,
                int(trainer_cfg.batch_size),
                device,
                seed=seed if train else None,
                crop_seed=crop_seed if train else None,
                augment=augment if train else (),
                resident=store.resident(split),
                sampler=sampler,
            )

        return ImageLoader(pil, from_store)

    return Splits(
        train=loader("train", True),
        valid=loader("valid", False),
        test=loader("test", False),
        classes=classes,
        root=root,
        mean=tuple(mean),
        std=tuple(std),
        crop_size=crop_size,
        skipped=skipped,
        resize=resize,
        crop_seed=crop_seed,
        augment=augment,
        sampler=sampler,
        groups=groups,
        group_aggregate=str(data_cfg.group_aggregate),
        store=store,
        listing=listing,
        files=files,
    )
