"""Validated ImageFolder splits -> DataLoaders.

Layout: ``root/{train,valid,test}/{class_a,class_b}/*``. Every problem with the tree is reported
as one line naming the path, before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from . import demo_data, faults
from .errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
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
    store: TileStore | None = None

    def eval_transform(self) -> transforms.Compose:
        return eval_transform(self.crop_size, self.mean, self.std, self.resize)


def check_root(data_cfg) -> Path | None:
    """The root keys, without generating or reading anything: the demo takes no ``data.root``; a
    user's folder must be given and exist. Returns that folder (None for the demo)."""
    if data_cfg.kind == "demo":
        if data_cfg.get("root") is not None:
            raise UserError(
                f"data.root={data_cfg.root} is set, but data=demo trains on the embedded demo data; "
                "add data=imagefolder to train on your folder"
            )
        return None
    if OmegaConf.is_missing(data_cfg, "root") or data_cfg.get("root") is None:
        raise UserError(
            "data=imagefolder needs data.root: add data.root=/path/to/tiles (a folder holding "
            "train/, valid/ and test/, each with one folder per class)"
        )
    root = Path(os.path.expanduser(str(data_cfg.root)))
    if not root.is_dir():
        raise UserError(
            f"data.root={data_cfg.root}: no such directory; point it at a folder holding "
            "train/, valid/ and test/, each with one folder per class"
        )
    return root


def resolve_root(data_cfg) -> Path:
    """The ImageFolder root of ``data``: generated for the demo, checked for a user's folder."""
    return check_root(data_cfg) or demo_data.ensure(data_cfg)


def is_image(path: Path) -> bool:
    """A file that should hold an image: every regular file of a class folder except hidden ones
    (``.DS_Store``, ``._*`` resource forks). Whether it decodes is checked by check_images."""
    return path.is_file() and not path.name.startswith(".")


def class_folders(split_folder: Path) -> list[str]:
    """The class folders of a split, sorted (hidden folders are not classes)."""
    return sorted(p.name for p in split_folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_images(class_folder: Path) -> list[Path]:
    """The images of a class folder, sorted (sub-folders included)."""
    return sorted(p for p in class_folder.rglob("*") if is_image(p))


def scan_tree(root: Path, crop_size: int, cache_dir=None, on_bad_image: str = "error"):
    """Check the tree; return (classes, good files per split, skipped [(path, reason)]).
    Raises UserError naming the path and what to do."""
    where = f"data.root={root}"
    if on_bad_image not in ("error", "skip"):
        raise UserError(f"data.on_bad_image={on_bad_image}: choose error or skip")
    classes_by_split: dict[str, list[str]] = {}
    files: dict[str, list[Path]] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise UserError(
                f"{where}: missing split folder '{split}' ({folder}); expected train/, valid/ and "
                "test/, each with one folder per class"
            )
        classes = class_folders(folder)
        if len(classes) != 2:
            shown = ", ".join(f"'{c}'" for c in classes) or "none"
            raise UserError(
                f"{where}: split '{split}' has {len(classes)} class folder"
                f"{'' if len(classes) == 1 else 's'} ({shown}); expected exactly 2"
            )
        classes_by_split[split] = classes
        files[split] = []
        for cls in classes:
            images = class_images(folder / cls)
            if not images:
                raise UserError(f"{where}: {folder / cls} has no images; add images or remove the folder")
            files[split].extend(images)
    train_classes = classes_by_split["train"]
    for split in ("valid", "test"):
        if classes_by_split[split] != train_classes:
            raise UserError(
                f"{where}: class folders differ between splits: train has {train_classes}, "
                f"{split} has {classes_by_split[split]}; use the same two names in every split"
            )
    all_files = [p for split in SPLITS for p in files[split]]
    bad = check_images(all_files, crop_size, cache_dir)
    if bad and on_bad_image == "error":
        raise UserError(bad_images_message(root, bad, crop_size, cache_dir))
    skipped = {p for p, _ in bad}
    for split in SPLITS:
        files[split] = [p for p in files[split] if str(p) not in skipped]
        for cls in train_classes:
            if not any(p.parent.relative_to(root / split).parts[:1] == (cls,) for p in files[split]):
                raise UserError(f"{where}: {root / split / cls} has no readable images left after skipping bad ones")
    if bad:
        log.warning(
            "skipped %d bad image(s) (data.on_bad_image=skip): %s", len(bad), "; ".join(f"{p} ({w})" for p, w in bad)
        )
    return train_classes, files, bad


def check_image(path: Path, crop_size: int) -> str | None:
    """None if the file decodes fully to an image at least crop x crop, else why not."""
    if path.stat().st_size == 0:
        return "zero-byte file"
    try:
        image = load_rgb(path)
    except Exception as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"cannot be read as an image ({text})"
    w, h = image.size
    if min(w, h) < crop_size:
        return f"image is {w}x{h}, smaller than the {crop_size}x{crop_size} crop"
    return None


EXAMPLES = 3  # bad files named in an error; the full list goes to a file in data.cache_dir
_SMALL = re.compile(r"image is (\d+)x(\d+), smaller than")
_UNREADABLE = re.compile(r"cannot be read as an image \((.*)\)$")


def bad_images_message(root: Path, bad: list[tuple[str, str]], crop_size: int, cache_dir=None) -> str:
    """One line for the bad images of a tree: one file is named with its reason; several are grouped
    by reason (too small, unreadable, zero-byte), each group said once with its count, a few examples
    and its fix. When files go unnamed, the full list is written to data.cache_dir and named."""
    if len(bad) == 1:
        path, why = bad[0]
        m = _SMALL.match(why)
        if m:
            side = min(int(m[1]), int(m[2]))
            return (
                f"{path}: {why}; set backbone.crop_size<={side} or backbone.resize={crop_size}, remove it, "
                "or set data.on_bad_image=skip"
            )
        return f"{path}: {why}; fix or remove it, or set data.on_bad_image=skip"

    def rel(path: str) -> str:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            return path

    small, unreadable, empty, other = [], [], [], []
    for path, why in bad:
        if m := _SMALL.match(why):
            small.append((path, f"{rel(path)} {m[1]}x{m[2]}", min(int(m[1]), int(m[2]))))
        elif m := _UNREADABLE.match(why):
            text = m[1].replace(f" '{path}'", "").replace(f" {path}", "")  # PIL repeats the full path
            unreadable.append((path, f"{rel(path)} ({text})"))
        elif why == "zero-byte file":
            empty.append((path, rel(path)))
        else:
            other.append((path, f"{rel(path)} ({why})"))

    def examples(group) -> str:
        shown = ", ".join(g[1] for g in group[:EXAMPLES])
        return f"e.g. {shown}, ..." if len(group) > EXAMPLES else shown

    def them(group) -> str:
        return "it" if len(group) == 1 else "them"

    def plural(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    # (what, fix) per reason, most files first
    groups = []
    if small:
        fix = f"set backbone.crop_size<={min(g[2] for g in small)} or backbone.resize={crop_size}"
        groups.append(
            (
                len(small),
                f"{plural(len(small), 'image is', 'images are')} smaller than the "
                f"{crop_size}x{crop_size} crop ({examples(small)})",
                fix,
            )
        )
    if unreadable:
        groups.append(
            (
                len(unreadable),
                f"{plural(len(unreadable), 'file', 'files')} cannot be read as "
                f"{'an image' if len(unreadable) == 1 else 'images'} "
                f"({examples(unreadable)})",
                f"fix or remove {them(unreadable)}",
            )
        )
    if empty:
        groups.append(
            (
                len(empty),
                f"{plural(len(empty), 'file is', 'files are')} empty (zero bytes: {examples(empty)})",
                f"remove {them(empty)}",
            )
        )
    if other:
        groups.append(
            (
                len(other),
                f"{plural(len(other), 'file', 'files')} cannot be used ({examples(other)})",
                f"fix or remove {them(other)}",
            )
        )
    groups.sort(key=lambda g: -g[0])
    where = f"data.root={root}"
    if len(groups) == 1:
        _, what, fix = groups[0]
        message = f"{where}: {what}; {fix}, or set data.on_bad_image=skip"
    else:
        message = (
            f"{where}: {len(bad)} bad images: "
            + "; ".join(f"{what}: {fix}" for _, what, fix in groups)
            + "; or set data.on_bad_image=skip to leave them all out"
        )
    unnamed = any(len(g) > EXAMPLES for g in (small, unreadable, empty, other))
    listed = bad_images_file(root, bad, cache_dir) if unnamed else None
    return f"{message} (all {len(bad)} listed in {listed})" if listed else message


def bad_images_file(root: Path, bad: list[tuple[str, str]], cache_dir) -> Path | None:
    """Every bad image of the tree, one ``path<TAB>reason`` a line, in
    ``cache_dir/bad-images/<root>.tsv`` (None without a cache folder or when it cannot be written)."""
    if cache_dir is None:
        return None
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    path = Path(os.path.expanduser(str(cache_dir))) / "bad-images" / f"{Path(root).resolve().name}-{key}.tsv"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(f"{p}\t{why}\n" for p, why in bad))
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def check_images(paths: list[Path], crop_size: int, cache_dir=None) -> list[tuple[str, str]]:
    """Decode every file once; results cached by (path, size, mtime) so later jobs and sweeps skip
    the work. Returns [(path, reason)] of the bad ones, in order."""
    cache_file = None
    cache: dict = {}
    if cache_dir is not None:
        cache_file = Path(os.path.expanduser(str(cache_dir))) / "image-checks.json"
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        if cache_file.exists():
            try:
                cache = json.loads(cache_file.read_text())
            except ValueError:
                cache = {}
    bad, changed = [], False
    for path in paths:
        st = path.stat()
        key = f"{path.resolve()}|{crop_size}|2"  # 2: reasons without advice (scan_tree adds it)
        stamp = [st.st_size, st.st_mtime_ns]
        entry = cache.get(key)
        if entry is None or entry[0] != stamp:
            entry = [stamp, check_image(path, crop_size)]
            cache[key] = entry
            changed = True
        if entry[1] is not None:
            bad.append((str(path), entry[1]))
    if cache_file is not None and changed:
        with FileLock(str(cache_file) + ".lock"):
            merged = json.loads(cache_file.read_text()) if cache_file.exists() else {}
            merged.update(cache)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, cache_file)
    return bad


def eval_transform(crop: int, mean, std, resize: int | None = None) -> transforms.Compose:
    steps = [transforms.Resize(resize)] if resize else []
    return transforms.Compose(
        steps + [transforms.CenterCrop(crop), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


# ---------------------------------------------------------------- the training crops, shared with the feature bank
# A training image's random crop is a pure function of (crop seed, image index, view), and epoch e uses view
# view_of(e); batches are shuffled by (run seed, epoch). The naive loop and the feature bank draw from the
# same functions, so with trainer.bank_views >= max_epochs the bank reproduces the naive loop crop for crop,
# and a resumed job draws exactly what an uninterrupted one would.


def view_of(epoch: int) -> int:
    """Epoch 0 (measuring the untrained model) uses view 0; training epoch e >= 1 uses view e - 1."""
    return max(int(epoch) - 1, 0)


def crop_offset(size: tuple[int, int], crop: int, seed: int, index: int, view: int) -> tuple[int, int]:
    """(top, left) of the random ``crop`` x ``crop`` window of training image ``index`` (``size`` = (w, h))."""
    w, h = size
    rng = np.random.default_rng([int(seed), int(index), int(view)])
    return int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))


def centre_offset(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(top, left) of the centre ``crop`` x ``crop`` window (``size`` = (w, h)), rounded as torchvision's
    center_crop rounds."""
    w, h = size
    return round((h - crop) / 2.0), round((w - crop) / 2.0)


AUGMENTS = ("hflip", "vflip", "rot90")


def augment_ops(augment, seed: int, index: int, view: int) -> tuple:
    """The flips and rotation (``data.augment``) of training image ``index`` at ``view``: a pure
    function of (crop seed, image, view), like its crop, drawn from a stream of its own.
    Returns ``(hflip, vflip, quarter turns)``, or ``()`` when ``augment`` is empty."""
    if not augment:
        return ()
    rng = np.random.default_rng([int(seed), int(index), int(view), 1])
    hflip, vflip, turns = bool(rng.integers(2)), bool(rng.integers(2)), int(rng.integers(4))
    return ("hflip" in augment and hflip, "vflip" in augment and vflip, turns if "rot90" in augment else 0)


def apply_augment(crop: np.ndarray, ops: tuple) -> np.ndarray:
    """``ops`` (augment_ops) on an HxWx3 crop: horizontal flip, vertical flip, then quarter turns
    counter-clockwise. Views where possible; the batcher copies them."""
    hflip, vflip, turns = ops
    if hflip:
        crop = crop[:, ::-1]
    if vflip:
        crop = crop[::-1]
    return np.rot90(crop, turns, axes=(0, 1)) if turns else crop


def apply_augment_tensor(crop: torch.Tensor, ops: tuple) -> torch.Tensor:
    """``apply_augment`` on an HxWx3 tensor (on any device)."""
    hflip, vflip, turns = ops
    if hflip:
        crop = crop.flip(1)
    if vflip:
        crop = crop.flip(0)
    return torch.rot90(crop, turns, dims=(0, 1)) if turns else crop


def check_augment(augment) -> tuple:
    augment = tuple(str(a) for a in (augment or ()))
    unknown = [a for a in augment if a not in AUGMENTS]
    if unknown:
        raise UserError(
            f"data.augment={list(augment)}: unknown {unknown[0]}; choose from {', '.join(AUGMENTS)} "
            "(e.g. data.augment=[hflip,vflip,rot90]), or [] for none"
        )
    return augment


def shuffled(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch`` for run seed ``seed``."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def resized(image: Image.Image, resize: int | None) -> Image.Image:
    return TF.resize(image, resize) if resize else image


class Tiles(Dataset):
    """(image, label) of one split. With ``crop_seed`` (training): the random crop of (image, epoch) from
    crop_offset; without (evaluation): the centre crop. ``epoch`` is set by the loader's set_epoch."""

    def __init__(self, samples: list[tuple[Path, int]], crop: int, mean, std, resize=None, crop_seed=None, augment=()):
        self.samples, self.crop, self.mean, self.std = samples, crop, mean, std
        self.resize, self.crop_seed, self.epoch, self.augment = resize, crop_seed, 0, tuple(augment or ())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = resized(load_rgb(path), self.resize)
        ops = ()
        if self.crop_seed is None:
            top, left = centre_offset(image.size, self.crop)
        else:
            top, left = crop_offset(image.size, self.crop, self.crop_seed, i, view_of(self.epoch))
            ops = augment_ops(self.augment, self.crop_seed, i, view_of(self.epoch))
        image = TF.crop(image, top, left, self.crop, self.crop)
        if ops:
            image = apply_augment(np.asarray(image), ops).copy()  # contiguous and writable, as to_tensor wants
        return TF.normalize(TF.to_tensor(image), self.mean, self.std), label


class EpochShuffle(Sampler):
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(shuffled(self.n, self.seed, self.epoch).tolist())


class Loader(DataLoader):
    """A DataLoader whose crops and order follow ``set_epoch`` (called by the training loop)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch
        if isinstance(self.sampler, EpochShuffle):
            self.sampler.epoch = epoch


def load_rgb(path) -> Image.Image:
    """Any image as 8-bit RGB, upright: EXIF orientation applied; grey, palette, RGBA, CMYK and 16-bit
    images converted (16-bit scaled to 8-bit, not clipped). Fully decoded, so truncation shows."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        elif im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
        image = im.convert("RGB")
        image.load()
        return image


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
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{path}: cannot be read as an image ({why}); fix or remove it") from None
        x = to_tensor(image).to(torch.float64).flatten(1)
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


def tree_files(root: Path) -> list[Path]:
    """Every image file of the three splits' class folders (as training reads them), unchecked."""
    return [
        p
        for split in SPLITS
        if (root / split).is_dir()
        for cls in class_folders(root / split)
        for p in class_images(root / split / cls)
    ]


def data_fingerprint(data_cfg) -> str:
    """What identifies the data a job trains on: the root's files (paths, sizes, mtimes). Part of
    the resume key, the auto-named Optuna study and the feature bank's key, so adding, removing or
    changing an image is a different job, never a reuse of the old data's results."""
    return fingerprint(tree_files(resolve_root(data_cfg)))


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


def build(
    data_cfg,
    trainer_cfg,
    crop_size: int = 224,
    seed: int = 0,
    resize: int | None = None,
    crop_seed: int = 0,
    device: torch.device | None = None,
) -> Splits:
    root = resolve_root(data_cfg)
    if resize is not None and (not isinstance(resize, int) or resize < crop_size):
        raise UserError(f"backbone.resize={resize}: must be null or an integer >= backbone.crop_size ({crop_size})")
    if not isinstance(crop_seed, int) or crop_seed < 0:
        raise UserError(f"trainer.crop_seed={crop_seed}: must be an integer >= 0")
    augment = check_augment(data_cfg.get("augment"))
    # with a resize, any image can be cropped; without one, images must be at least the crop
    classes, files, skipped = scan_tree(
        root, crop_size if not resize else 1, data_cfg.cache_dir, str(data_cfg.get("on_bad_image", "error"))
    )
    if data_cfg.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif data_cfg.normalize == "dataset":
        mean, std = dataset_stats(files["train"], data_cfg.cache_dir)
    else:
        raise UserError(f"data.normalize={data_cfg.normalize}: choose imagenet or dataset")
    device = device or torch.device("cpu")
    store = TileStore(data_cfg, files, resize, device)

    def loader(split: str, train: bool) -> ImageLoader:
        samples = [(p, classes.index(p.relative_to(root / split).parts[0])) for p in files[split]]
        ds = Tiles(samples, crop_size, mean, std, resize, crop_seed if train else None, augment if train else ())
        workers = int(trainer_cfg.num_workers)
        pil = Loader(
            ds,
            batch_size=int(trainer_cfg.batch_size),
            sampler=EpochShuffle(len(ds), seed) if train else None,
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
            from .batches import StoreLoader

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
        store=store,
    )


class TileStore:
    """The data set's decoded tile store (``tiles.get``), opened at first use and shared by the
    three splits' loaders and the feature bank's extraction; ``None`` images where there is none
    (``data.tile_store=off``, or too large: ``tiles`` says why in one line)."""

    def __init__(self, data_cfg, files: dict[str, list[Path]], resize, device: torch.device):
        self.data_cfg, self.files, self.resize, self.device = data_cfg, files, resize, device
        self._store, self._opened = None, False

    def get(self):
        if not self._opened:
            from . import tiles

            self._store, self._opened = tiles.get(self.data_cfg, self.files, self.resize), True
        return self._store

    def images(self, split: str):
        store = self.get()
        return store.images(split) if store is not None else None

    def resident(self, split: str) -> bool:
        """Keep the split on the device (``data.tile_store_device``): ``on``; ``auto``: on CUDA when
        its pixels take under a quarter of the free device memory; ``off``."""
        choice = str(self.data_cfg.get("tile_store_device", "auto"))
        if choice not in ("auto", "on", "off"):
            raise UserError(f"data.tile_store_device={choice}: choose auto, on or off")
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
