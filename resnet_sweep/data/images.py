"""The ImageFolder tree on disk: ``root/{train,valid,test}/{class_a,class_b}/*``. Every problem with
the tree (a missing split, a wrong number of classes, unreadable or too small images) is one line
naming the path and what to do, before any training starts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageOps

from resnet_sweep.config.checks import SPLITS
from resnet_sweep.core import sealed
from resnet_sweep.core.errors import UserError, first_line

log = logging.getLogger(__name__)


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


@dataclass
class Listing:
    """The ImageFolder tree as ``list_tree`` found it, once: its classes, every image file of each
    split in the loaders' order with its label, and each file's stamp (resolved path, size, mtime),
    from which every fingerprint of these files is computed without touching the disk again."""

    root: Path
    classes: list[str]
    files: dict[str, list[Path]]
    labels: dict[str, list[int]]
    stamps: dict[str, tuple[str, int, int]]  # str(path) -> (resolved path, size, mtime_ns)
    fingerprints: dict[str, str] = field(default_factory=dict)  # "all" and each split's, once computed

    @property
    def fingerprint(self) -> str:
        """``fingerprint`` of every listed file (what ``data.data_fingerprint`` returns), computed once."""
        if "all" not in self.fingerprints:
            self.fingerprints["all"] = fingerprint([p for s in SPLITS for p in self.files[s]], self.stamps)
        return self.fingerprints["all"]

    def split_fingerprint(self, split: str) -> str:
        """``fingerprint`` of one split's listed files, computed once."""
        if split not in self.fingerprints:
            self.fingerprints[split] = fingerprint(self.files[split], self.stamps)
        return self.fingerprints[split]

    def to_json(self) -> dict:
        for split in SPLITS:  # computed here once, for every process that reads the record
            self.split_fingerprint(split)
        return {
            "root": str(self.root),
            "classes": self.classes,
            "files": {s: [str(p) for p in paths] for s, paths in self.files.items()},
            "labels": self.labels,
            "stamps": self.stamps,
            "fingerprints": {"all": self.fingerprint, **self.fingerprints},
        }

    @classmethod
    def from_json(cls, record: dict) -> Listing:
        return cls(
            root=Path(record["root"]),
            classes=list(record["classes"]),
            files={s: [Path(p) for p in paths] for s, paths in record["files"].items()},
            labels={s: list(v) for s, v in record["labels"].items()},
            stamps={k: (v[0], int(v[1]), int(v[2])) for k, v in record["stamps"].items()},
            fingerprints={k: str(v) for k, v in record["fingerprints"].items()},
        )


def _image_files(folder: Path, real: str, stamps: dict) -> list[Path]:
    """``class_images(folder)`` with each file's stamp recorded in ``stamps``, ``real`` being the
    folder's resolved path: one ``stat`` per file, a ``realpath`` only for symlinks (as pathlib's
    ``rglob``, sub-folders that are symlinks are not entered)."""
    found = []
    with os.scandir(folder) as entries:
        entries = list(entries)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            found.extend(_image_files(Path(entry.path), f"{real}/{entry.name}", stamps))
        elif entry.is_file() and not entry.name.startswith("."):
            st = entry.stat()
            resolved = os.path.realpath(entry.path) if entry.is_symlink() else f"{real}/{entry.name}"
            stamps[entry.path] = (resolved, st.st_size, st.st_mtime_ns)
            found.append(Path(entry.path))
    return found


def list_tree(root: Path) -> Listing:
    """The tree's classes and files, each file stat-ed once; raises UserError naming the path and what
    to do for a missing split, a split with fewer than two class folders, an empty class folder, or
    class folders that differ between splits. Whether images decode is ``image_checks``' business."""
    where = f"data.root={root}"
    root = Path(root)
    classes_by_split: dict[str, list[str]] = {}
    files: dict[str, list[Path]] = {}
    labels: dict[str, list[int]] = {}
    stamps: dict[str, tuple[str, int, int]] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise UserError(
                f"{where}: missing split folder '{split}' ({folder}); expected train/, valid/ and "
                "test/, each with one folder per class"
            )
        classes = class_folders(folder)
        if len(classes) < 2:
            shown = ", ".join(f"'{c}'" for c in classes) or "none"
            raise UserError(
                f"{where}: split '{split}' has {len(classes)} class folder"
                f"{'' if len(classes) == 1 else 's'} ({shown}); expected 2 or more, one per class"
            )
        classes_by_split[split] = classes
        files[split], labels[split] = [], []
        for label, cls in enumerate(classes):
            found = sorted(_image_files(folder / cls, os.path.realpath(folder / cls), stamps))
            if not found:
                raise UserError(f"{where}: {folder / cls} has no images; add images or remove the folder")
            files[split].extend(found)
            labels[split].extend([label] * len(found))
    train_classes = classes_by_split["train"]
    for split in ("valid", "test"):
        if classes_by_split[split] != train_classes:
            missing = [c for c in train_classes if c not in classes_by_split[split]]
            extra = [c for c in classes_by_split[split] if c not in train_classes]
            what = (
                f"{split}/ has no folder '{missing[0]}' ({root / split / missing[0]})"
                if missing
                else f"{split}/{extra[0]} is not a class folder of train/"
            )
            raise UserError(
                f"{where}: class folders differ between splits: {what}; train has {train_classes}, "
                f"{split} has {classes_by_split[split]}; use the same class folders in every split"
            )
    return Listing(root, train_classes, files, labels, stamps)


def scan_tree(root: Path, crop_size: int, cache_dir=None, on_bad_image: str = "error"):
    """Check the tree; return (classes, good files per split, skipped [(path, reason)]).
    Raises UserError naming the path and what to do (``list_tree``, ``image_checks``, ``usable``)."""
    if on_bad_image not in ("error", "skip"):
        raise UserError(f"data.on_bad_image={on_bad_image}: choose error or skip")
    listing = list_tree(root)
    every = [p for split in SPLITS for p in listing.files[split]]
    checks = image_checks(every, cache_dir, stamps=listing.stamps)
    files, _, bad = usable(listing, checks, crop_size, on_bad_image, cache_dir)
    return listing.classes, files, bad


def group_of(name: str, pattern: re.Pattern | None) -> str | None:
    """The group key of a file (slide, patient...): the regex's first capture group (the whole match
    if it has none) searched in ``name``, the file's path below its class folder; None if it does not
    match or captures nothing. Without a regex, the file is its own group. ``resnet-sweep split
    --group`` and ``data.group`` share this rule."""
    if pattern is None:
        return name
    m = pattern.search(name)
    if m is None:
        return None
    key = m.group(1) if pattern.groups else m.group(0)
    return key or None


def group_key(path: Path, below: str, pattern: re.Pattern | None, setting: str) -> str:
    """``group_of(below, pattern)`` for the file ``path``, or one line naming the file when the regex
    misses it; ``setting`` is the regex as the user gave it (``--group '...'``, ``data.group='...'``)."""
    key = group_of(below, pattern)
    if key is None:
        raise UserError(
            f"{path}: {setting} does not match '{below}' (or captures nothing); fix the regex or move the file"
        )
    return key


def compile_group(regex: str | None, key: str = "--group") -> re.Pattern | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise UserError(f"{key} '{regex}': not a regular expression ({e})") from None


def file_groups(root: Path, files: dict[str, list[Path]], regex: str) -> dict[str, list[str]]:
    """``data.group``: the group of every file of each split (in ``files``' order). A file the regex
    does not match, or a group with tiles in two classes, is one line naming it."""
    pattern = compile_group(str(regex), "data.group")
    groups: dict[str, list[str]] = {}
    for split, paths in files.items():
        class_of: dict[str, tuple[str, Path]] = {}
        keys = []
        prefix = f"{root / split}{os.sep}"
        for path in paths:
            text = str(path)  # (by its text: pathlib's relative_to costs some 50x more, for every file)
            below = text[len(prefix) :] if text.startswith(prefix) else path.relative_to(root / split).as_posix()
            cls, _, below = below.replace(os.sep, "/").partition("/")
            key = group_key(path, below, pattern, f"data.group='{regex}'")
            seen = class_of.setdefault(key, (cls, path))
            if seen[0] != cls:
                raise UserError(
                    f"data.group='{regex}': group '{key}' of split '{split}' has tiles in two classes "
                    f"('{seen[0]}': {seen[1]}, '{cls}': {path}); a slide or patient has one class"
                )
            keys.append(key)
        groups[split] = keys
    return groups


def check_image(path: Path, crop_size: int) -> str | None:
    """None if the file decodes fully to an image at least crop x crop, else why not."""
    return reason(inspect(path)[1], crop_size)


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
        sealed.write_text(path, "".join(f"{p}\t{why}\n" for p, why in bad))
    except OSError:
        return None
    return path


def check_images(paths: list[Path], crop_size: int, cache_dir=None) -> list[tuple[str, str]]:
    """Every file decoded at most once (``image_checks``, cached); returns [(path, reason)] of those
    that cannot be used at ``crop_size``, in order."""
    checks = image_checks(paths, cache_dir)
    return [(str(p), why) for p in paths if (why := reason(checks[str(p)], crop_size)) is not None]


CHECKS_VERSION = 3  # 3: an entry is the decoded size [w, h] (any crop is checked against it) or why not


def inspect(path: Path) -> tuple[Image.Image | None, list | str]:
    """The file decoded once (``load_rgb``) -> (image, its [width, height]), or (None, why it is not
    an image): what a check records, whatever the crop."""
    if path.stat().st_size == 0:
        return None, "zero-byte file"
    try:
        image = load_rgb(path)
    except Exception as e:
        return None, f"cannot be read as an image ({first_line(e)})"
    return image, list(image.size)


def reason(result: list | str, crop_size: int) -> str | None:
    """Why a file whose check found ``result`` cannot be used at ``crop_size``; None if it can."""
    if isinstance(result, str):
        return result
    w, h = result
    return f"image is {w}x{h}, smaller than the {crop_size}x{crop_size} crop" if min(w, h) < crop_size else None


def _stamps_of(paths: list[Path]) -> dict[str, tuple[str, int, int]]:
    out = {}
    for p in paths:
        st = p.stat()
        out[str(p)] = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    return out


def image_checks(
    paths: list[Path],
    cache_dir=None,
    *,
    stamps: dict | None = None,
    decode: Callable[[list[Path]], dict[str, list | str]] | None = None,
) -> dict[str, list | str]:
    """str(path) -> its check (``inspect``'s [w, h] or reason) for every file, each decoded at most once:
    results are cached in ``cache_dir/image-checks.json`` by resolved path, size and mtime, so later
    jobs and sweeps skip the work. ``stamps`` (``Listing.stamps``) saves stat-ing the files again;
    ``decode(paths) -> {str(path): result}`` checks the files not cached (default: ``inspect`` on every
    core; ``tiles`` passes one that builds the store from the same decode)."""
    stamps = stamps if stamps is not None else _stamps_of(paths)
    cache_file = None
    cache: dict = {}
    if cache_dir is not None:
        cache_file = Path(os.path.expanduser(str(cache_dir))) / "image-checks.json"
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_checks(cache_file)
    results, missing = {}, []
    for path in paths:
        resolved, size, mtime = stamps[str(path)]
        entry = cache.get(f"{resolved}|{CHECKS_VERSION}")
        if entry is not None and entry[0] == [size, mtime]:
            results[str(path)] = entry[1]
        else:
            missing.append(path)
    if not missing:
        return results
    found = (decode or inspect_all)(missing)
    results.update(found)
    if cache_file is not None:
        new = {f"{stamps[str(p)][0]}|{CHECKS_VERSION}": [list(stamps[str(p)][1:]), found[str(p)]] for p in missing}
        with FileLock(str(cache_file) + ".lock"):
            merged = _read_checks(cache_file)
            merged.update(new)
            sealed.write_text(cache_file, json.dumps(merged))
    return results


def _read_checks(cache_file: Path) -> dict:
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}


def inspect_all(paths: list[Path]) -> dict[str, list | str]:
    """``inspect`` of every file, on every core (PIL releases the GIL while it decodes)."""
    from concurrent.futures import ThreadPoolExecutor

    from resnet_sweep.data.cores import available

    with ThreadPoolExecutor(available(), thread_name_prefix="image-check") as pool:
        return {str(p): result for p, (_, result) in zip(paths, pool.map(inspect, paths, chunksize=16))}


def usable(
    listing: Listing, checks: dict[str, list | str], crop_size: int, on_bad_image: str = "error", cache_dir=None
) -> tuple[dict[str, list[Path]], dict[str, list[int]], list[tuple[str, str]]]:
    """The listing's files (and labels) that can be used at ``crop_size``, and the bad ones
    [(path, reason)]: with ``on_bad_image=error`` any bad file is one line (UserError); with
    ``skip`` they are left out (one warning line), and a class left with none is an error."""
    if on_bad_image not in ("error", "skip"):
        raise UserError(f"data.on_bad_image={on_bad_image}: choose error or skip")
    root, where = listing.root, f"data.root={listing.root}"
    bad = []
    files, labels = {}, {}
    for split in SPLITS:
        keep = []
        for i, path in enumerate(listing.files[split]):
            why = reason(checks[str(path)], crop_size)
            if why is None:
                keep.append(i)
            else:
                bad.append((str(path), why))
        if len(keep) == len(listing.files[split]):
            files[split], labels[split] = listing.files[split], listing.labels[split]
        else:
            files[split] = [listing.files[split][i] for i in keep]
            labels[split] = [listing.labels[split][i] for i in keep]
    if bad and on_bad_image == "error":
        raise UserError(bad_images_message(root, bad, crop_size, cache_dir))
    for split in SPLITS:
        present = set(labels[split])
        for label, cls in enumerate(listing.classes):
            if label not in present:
                raise UserError(f"{where}: {root / split / cls} has no readable images left after skipping bad ones")
    if bad:
        log.warning(
            "skipped %d bad image(s) (data.on_bad_image=skip): %s", len(bad), "; ".join(f"{p} ({w})" for p, w in bad)
        )
    return files, labels, bad


def fingerprint(paths: list[Path], stamps: dict | None = None) -> str:
    """Identifies a set of files by path, size and modification time; with ``stamps``
    (``Listing.stamps``, the same values as found when the tree was listed) without stat-ing them."""
    h = hashlib.sha256()
    for p in sorted(paths):
        resolved, size, mtime = stamps[str(p)] if stamps is not None else _stamps_of([p])[str(p)]
        h.update(f"{resolved}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


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
