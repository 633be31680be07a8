"""The ImageFolder tree on disk: ``root/{train,valid,test}/{class_a,class_b}/*``. Every problem with
the tree (a missing split, a wrong number of classes, unreadable or too small images) is one line
naming the path and what to do, before any training starts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageOps

from . import sealed
from .checks import SPLITS
from .errors import UserError, first_line

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
        if len(classes) < 2:
            shown = ", ".join(f"'{c}'" for c in classes) or "none"
            raise UserError(
                f"{where}: split '{split}' has {len(classes)} class folder"
                f"{'' if len(classes) == 1 else 's'} ({shown}); expected 2 or more, one per class"
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
        for path in paths:
            cls, *below = path.relative_to(root / split).parts
            key = group_key(path, "/".join(below), pattern, f"data.group='{regex}'")
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
    if path.stat().st_size == 0:
        return "zero-byte file"
    try:
        image = load_rgb(path)
    except Exception as e:
        text = first_line(e)
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
        sealed.write_text(path, "".join(f"{p}\t{why}\n" for p, why in bad))
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
            sealed.write_text(cache_file, json.dumps(merged))
    return bad


def fingerprint(paths: list[Path]) -> str:
    """Identifies a set of files by path, size and modification time."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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
