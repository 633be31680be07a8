"""Validated ImageFolder splits -> batches: the data set a job trains on (the demo's, generated once,
or the user's folder, checked whole by ``images.scan_tree``), its normalisation, and one loader per
split, from the decoded tile store where there is one, else decoded by PIL (``crops``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from torchvision import transforms

from resnet_sweep.config.checks import SPLITS, check_augment, check_root, check_sampler
from resnet_sweep.core import faults, sealed
from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.core.registry import PROCESS
from resnet_sweep.data import demo_data
from resnet_sweep.data.crops import EpochShuffle, Loader, Tiles
from resnet_sweep.data.images import Listing, file_groups, fingerprint, image_checks, list_tree, load_rgb, usable

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        """``images.fingerprint`` of the split's files (in its loader), from the stamps taken when the
        tree was listed, computed once per sweep when no file was left out: what a cache keyed by
        the files uses (the feature bank), without stat-ing every file in every job."""
        return split_fingerprint(self.listing, self.files, split)


def split_fingerprint(listing: Listing | None, files: dict[str, list[Path]], split: str) -> str:
    """``images.fingerprint(files[split])``: the listing's own (computed once) when they are its files,
    else from its stamps (or, without a listing, from the disk)."""
    if listing is not None and files[split] is listing.files[split]:
        return listing.split_fingerprint(split)
    return fingerprint(files[split], listing.stamps if listing is not None else None)


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
    tree = _remembered(_record(share, root)) if share is not None else None
    return (tree.listing if tree is not None else list_tree(root)).fingerprint


# ---------------------------------------------------------------- what a sweep's jobs share
# What depends only on the data (the tree's listing, every file's stamp and check) is made once per
# sweep: by its pre-flight (``start_sweep_share``, then ``checked_tree`` for the first point), else by
# the first job that needs it, and written to ``<sweep dir>/.sweep-data/<root key>.json``; the other
# jobs read that record (once per process: then remembered while the file is unchanged). A new sweep
# starts with an empty folder, so it lists and stamps the data afresh: a file added or changed
# between two sweeps is seen. Within a sweep, the data is as it was when the sweep first listed it.

SHARE_FOLDER = ".sweep-data"
# the share folder of the sweep this process started; record path -> (the record's stat, its tree)
_share: dict[str, str | None] = PROCESS.state("loading.share", {"folder": None})
_trees: dict[str, tuple[tuple, CheckedTree]] = PROCESS.state("loading.trees")


@dataclass
class CheckedTree:
    """A tree as listed (``images.Listing``) and every listed file's check (``images.image_checks``)."""

    listing: Listing
    checks: dict[str, list | str]
    _usable: dict = field(default_factory=dict, repr=False)
    _samples: dict = field(default_factory=dict, repr=False)

    def samples(self, files: dict, labels: dict, split: str) -> list[tuple[Path, int]]:
        """(file, label) of ``split`` in loader order, read-only: made once and shared by the sweep's
        jobs when the split is the listed one whole (20,000 new tuples a job otherwise: the garbage
        collector's scans of a job's large heap made that some 0.1 s a split)."""
        if files[split] is not self.listing.files[split]:
            return list(zip(files[split], labels[split]))
        if split not in self._samples:
            self._samples[split] = list(zip(files[split], labels[split]))
        return self._samples[split]

    def usable(self, crop_size: int, on_bad_image: str, cache_dir) -> tuple[dict, dict, list]:
        """``images.usable`` of the tree at ``crop_size``; when no file is bad, remembered for the
        sweep's other jobs (a bad file's warning or error line is each job's own)."""
        if (crop_size, on_bad_image) in self._usable:
            return self._usable[crop_size, on_bad_image]
        found = usable(self.listing, self.checks, crop_size, on_bad_image, cache_dir)
        if not found[2]:
            self._usable[crop_size, on_bad_image] = found
        return found


def start_sweep_share(sweep_dir: Path) -> Path:
    """The folder in which the jobs of the sweep in ``sweep_dir`` share what depends only on the data,
    emptied: called once by the sweep's pre-flight, before any job."""
    folder = Path(sweep_dir).absolute() / SHARE_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _share["folder"] = str(folder)
    _trees.clear()
    return folder


def sweep_share(hc) -> Path | None:
    """The share folder of the sweep of Hydra config ``hc`` (``hydra.*``: a multirun job whose sweep's
    pre-flight made one), else None (``hc`` None: outside Hydra). Outside a job, Hydra's config may be
    an earlier sweep's: a process that started a sweep only trusts that sweep's folder."""
    from hydra.types import RunMode

    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    folder = (Path(str(hc.runtime.cwd)) / str(hc.sweep.dir)).absolute() / SHARE_FOLDER
    if _share["folder"] is not None and _share["folder"] != str(folder):
        return None
    return folder if folder.is_dir() else None


def _record(share: Path, root: Path) -> Path:
    return share / f"{hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:16]}.json"


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remembered(record: Path) -> CheckedTree | None:
    """The tree in ``record``: remembered from an earlier job of this process while the file is
    unchanged, else read (None when there is none, or it is unreadable)."""
    stat = _stat(record)
    if stat is None:
        return None
    known = _trees.get(str(record))
    if known is not None and known[0] == stat:
        return known[1]
    try:
        raw = json.loads(record.read_text())
        tree = CheckedTree(Listing.from_json(raw["listing"]), dict(raw["checks"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _trees[str(record)] = (stat, tree)
    return tree


def check_tree(data_cfg, root: Path, *, crop_size: int = 1, resize: int | None = None) -> CheckedTree:
    """The tree listed (each file stat-ed once) and every file checked, each image decoded at most once
    (cached in ``data.cache_dir``): when some must be decoded and a tile store is wanted, the same
    decode builds the store of the files that can be used at ``crop_size`` after ``resize``."""
    from resnet_sweep.data import tiles

    listing = list_tree(root)
    every = [p for split in SPLITS for p in listing.files[split]]
    decode = tiles.check_and_store(data_cfg, listing, crop_size=crop_size, resize=resize)
    return CheckedTree(listing, image_checks(every, data_cfg.cache_dir, stamps=listing.stamps, decode=decode))


def checked_tree(
    data_cfg, root: Path, *, crop_size: int = 1, resize: int | None = None, share: Path | None = None
) -> CheckedTree:
    """``check_tree`` once per sweep: in a sweep's job (its ``share`` folder), the record its pre-flight
    or first job made (made now, under a file lock, when there is none); in a single run, now."""
    if share is None:
        return check_tree(data_cfg, root, crop_size=crop_size, resize=resize)
    return share_tree(share, data_cfg, root, crop_size=crop_size, resize=resize)


def share_tree(share: Path, data_cfg, root: Path, *, crop_size: int = 1, resize: int | None = None) -> CheckedTree:
    """The record of ``root`` in the sweep's ``share`` folder, made by ``check_tree`` if there is none."""
    record = _record(share, root)
    tree = _remembered(record)
    if tree is not None:
        return tree
    with FileLock(str(record) + ".lock"):
        tree = _remembered(record)
        if tree is None:
            tree = check_tree(data_cfg, root, crop_size=crop_size, resize=resize)
            sealed.write_text(record, json.dumps({"listing": tree.listing.to_json(), "checks": tree.checks}))
            _trees[str(record)] = (_stat(record), tree)
    return tree


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


def worker_context():
    """How DataLoader workers start: the platform's standard method. Inside a joblib worker
    (``hydra/launcher=joblib``) the default context is loky's, which cannot start them."""
    method = multiprocessing.get_start_method(allow_none=True)
    standard = multiprocessing.get_all_start_methods()
    return None if method in standard else multiprocessing.get_context(standard[0])


class ImageLoader:
    """One split's batches: from the decoded tile store where there is one (``batches.StoreLoader``:
    no decoding, batches built on the device), else decoded by PIL in a DataLoader (``pil``). The
    choice is made at first use, so a job that trains on the feature bank never builds the store.
    ``dataset`` is the PIL dataset either way (its ``samples`` are the split's files and labels)."""

    def __init__(self, pil: Loader, from_store):
        self.pil, self._from_store, self._loader, self.epoch = pil, from_store, None, 0

    @property
    def dataset(self) -> Tiles:
        return self.pil.dataset

    def loader(self):
        if self._loader is None:
            self._loader = self._from_store() or self.pil
        return self._loader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.pil.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader())

    def __iter__(self):
        loader = self.loader()
        loader.set_epoch(self.epoch)
        with faults.deferred():  # DataLoader workers start and stop whole, even under Ctrl-C / SIGTERM
            batches = iter(loader)
        try:
            yield from batches
        finally:
            with faults.deferred(stop_after=False):
                shutdown = getattr(batches, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()


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


class TileStore:
    """The data set's decoded tile store (``tiles.get``), opened at first use and shared by the
    three splits' loaders and the feature bank's extraction; ``None`` images where there is none
    (``data.tile_store=off``, or too large: ``tiles`` says why in one line)."""

    def __init__(self, data_cfg, files: dict[str, list[Path]], resize, device: torch.device, *, listing=None):
        self.data_cfg, self.files, self.resize, self.device = data_cfg, files, resize, device
        self.listing = listing  # images.Listing: the store's key without stat-ing every file again
        self._store, self._opened = None, False

    def get(self):
        if not self._opened:
            from resnet_sweep.data import tiles

            listing = self.listing
            self._store = tiles.get(
                self.data_cfg,
                self.files,
                self.resize,
                stamps=listing.stamps if listing is not None else None,
                fingerprints={s: split_fingerprint(listing, self.files, s) for s in self.files},
            )
            self._opened = True
        return self._store

    def images(self, split: str):
        store = self.get()
        return store.images(split) if store is not None else None

    def resident(self, split: str) -> bool:
        """Keep the split on the device (``data.tile_store_device``): ``on``; ``auto``: on CUDA when
        its pixels take under a quarter of the free device memory; ``off``."""
        choice = str(self.data_cfg.tile_store_device)
        images = self.images(split)
        uniform = images.uniform() if images is not None else None
        if choice == "off" or uniform is None:
            return False
        if choice == "on":
            return True
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return uniform.nbytes < free / 4
