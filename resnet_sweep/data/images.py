"""Each image of the tree decoded and checked at most once: the decoding rules (``load_rgb``), what
a check records (its size, or why it is not an image), the checks cached by file stamp, and the
files usable at a crop size (``usable``; ``scan_tree``: the tree listed and checked whole). Every
problem is one line naming the path and what to do, before any training starts."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageOps

from resnet_sweep.config.checks import SPLITS
from resnet_sweep.core import sealed
from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.data.bad_images import bad_images_message
from resnet_sweep.data.image_folder import Listing, list_tree, stamps_of

log = logging.getLogger(__name__)


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


def check_image(path: Path, crop_size: int) -> str | None:
    """None if the file decodes fully to an image at least crop x crop, else why not."""
    return reason(inspect(path)[1], crop_size)


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
    stamps = stamps if stamps is not None else stamps_of(paths)
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
