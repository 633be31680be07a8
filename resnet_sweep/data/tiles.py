"""The decoded tile store: every image of a data set decoded once, memory-mapped by every later epoch,
run and sweep.

The first job that needs a data set decodes every image of its splits with every core (a thread
pool: PIL releases the GIL while decoding), through exactly the loaders' decode rules
(``crops.resized(load_rgb(path), resize)``: RGB, EXIF orientation, 16-bit scaled), into
``<data.cache_dir>/tiles/<key>/``:

- ``<split>.u8``: the split's images, HxWx3 uint8 each, one after another;
- ``<split>.index.npy``: (N, 3) int64, the offset, height and width of each image, so mixed sizes
  work; when all sizes are equal the file is an (N, H, W, 3) array, served as a memmap view;
- ``meta.json``: every file's size and SHA-256 (``sealed``).

Keyed by the files (paths in the loaders' order, sizes, mtimes), ``resize``, the decode rules
(``TILES_VERSION``) and the PIL and torchvision versions that decode and resize. Built under a file
lock by one job while concurrent jobs wait, in a temp folder renamed into place, and verified once
per process when opened: a truncated or damaged store is one warning line and a rebuild, never read.

``data.tile_store``: auto | off. With auto, a store whose size (sum of h*w*3, from the image headers
after the resize rule, without decoding) would exceed ``data.tile_store_max_gb`` or the free disk
of the cache folder is not built: one log line says so and the caller decodes with PIL as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torchvision
from PIL import Image

from resnet_sweep.core import faults, sealed
from resnet_sweep.core.registry import PROCESS
from resnet_sweep.data import crops
from resnet_sweep.data.cores import available as available_cores
from resnet_sweep.data.image_folder import fingerprint
from resnet_sweep.data.images import inspect, inspect_all, reason
from resnet_sweep.data.tile_reader import Store
from resnet_sweep.data.tile_writer import write_store

log = logging.getLogger(__name__)

TILES_VERSION = 1  # the decode rules: crops.resized(load_rgb(path), resize), HxWx3 uint8
GB = 1e9

# key -> bytes of its decoded images, from the headers: read once per process (the jobs a launcher runs
# one after another in one process, on data too large for a store, read the headers once)
_needed: dict[str, int] = PROCESS.state("tiles.needed")


def stored_size(path: Path, resize: int | None) -> tuple[int, int]:
    """(width, height) of the decoded image, up to EXIF orientation (which swaps them), from its
    header alone: torchvision's rule for ``resize`` (shorter side to ``resize``, longer side scaled
    and truncated). Enough for the store's size in bytes."""
    with Image.open(path) as im:
        w, h = im.size
    if resize and min(w, h) != resize:
        if w <= h:
            w, h = resize, int(resize * h / w)
        else:
            w, h = int(resize * w / h), resize
    return w, h


def key_of(
    files: dict[str, list[Path]], resize: int | None, stamps: dict | None = None, fingerprints: dict | None = None
) -> str:
    """The store's key; ``stamps`` (``image_folder.Listing.stamps``) saves stat-ing and resolving every file,
    ``fingerprints`` (each split's ``fingerprint``, computed once) hashing them again."""

    def resolved(p: Path) -> str:
        return stamps[str(p)][0] if stamps is not None else str(p.resolve())

    spec = {
        "version": TILES_VERSION,
        "pil": PIL.__version__,
        "torchvision": torchvision.__version__,
        "resize": resize,
        # the files with sizes and mtimes, and their order (image i of a split is files[split][i])
        "files": {s: (fingerprints or {}).get(s) or fingerprint(files[s], stamps) for s in files},
        "order": {s: hashlib.sha256("\n".join(resolved(p) for p in files[s]).encode()).hexdigest() for s in files},
    }
    return sealed.json_key(spec, 16)


def _fields(meta: dict) -> None:
    for n in meta["splits"].values():
        int(n)


def _header_bytes(paths: list[Path], resize, workers: int) -> int:
    """Sum of h*w*3 of the decoded images, from their headers (read by ``workers`` threads)."""

    def size(path: Path) -> int:
        try:
            w, h = stored_size(path, resize)
        except Exception:  # not an image: its check says so; it takes no room in the store
            return 0
        return w * h * 3

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(size, paths, chunksize=64))


def _max_gb(data_cfg) -> float:
    return float(data_cfg.tile_store_max_gb)  # >= 0: schema.DataConf, checked before any job


def _amount(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def root_of(data_cfg) -> Path:
    return Path(os.path.expanduser(str(data_cfg.cache_dir))) / "tiles"


def _choice(data_cfg) -> str:
    return str(data_cfg.tile_store)  # auto | off: schema.DataConf


def _fits(data_cfg, key: str, files: dict[str, list[Path]], resize) -> bool:
    """Whether the store of ``files`` fits under ``data.tile_store_max_gb`` and on the cache folder's
    free disk (from the image headers, read once per process and key); else one log line says so."""
    max_gb = _max_gb(data_cfg)
    n = sum(len(p) for p in files.values())
    if key not in _needed:
        _needed[key] = _header_bytes([p for s in files for p in files[s]], resize, available_cores())
    need = _needed[key]
    if need > max_gb * GB:
        log.info(
            "tile store not built: the %d decoded images would take %s, over data.tile_store_max_gb=%g; "
            "decoding them with PIL at every epoch instead",
            n,
            _amount(need),
            max_gb,
        )
        return False
    root = root_of(data_cfg)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free:
        log.warning(
            "tile store not built: the %d decoded images would take %s, but %s has %s free; "
            "decoding them with PIL at every epoch instead",
            n,
            _amount(need),
            root,
            _amount(free),
        )
        return False
    return True


def _meta(key: str, resize, stats: dict) -> dict:
    log.info(
        "tile store %s: %d images in %.1f s (%.1f img/s), %s",
        key,
        stats["images"],
        stats["seconds"],
        stats["img_per_s"],
        _amount(sum(stats["bytes"].values())),
    )
    return {"key": key, "version": TILES_VERSION, "resize": resize, **{k: v for k, v in stats.items() if k != "kept"}}


def get(
    data_cfg,
    files: dict[str, list[Path]],
    resize: int | None,
    *,
    stamps: dict | None = None,
    fingerprints: dict | None = None,
) -> Store | None:
    """The tile store of ``files`` (split -> image paths in the loaders' order, bad images already
    left out) decoded with ``resize``: reused when whole, else built (or rebuilt, with one warning
    line, when damaged) once under a file lock. None when ``data.tile_store=off``, or when it would
    exceed ``data.tile_store_max_gb`` or the free disk (one log line says so). ``stamps``
    (``image_folder.Listing.stamps``): the files' stamps as listed, so none is stat-ed again; ``fingerprints``:
    each split's, already computed."""
    if _choice(data_cfg) == "off":
        return None
    _max_gb(data_cfg)
    files = {str(s): [Path(p) for p in paths] for s, paths in files.items()}
    key = key_of(files, resize, stamps, fingerprints)
    root = root_of(data_cfg)
    path = root / key
    meta, _ = sealed.check(path, _fields)
    if meta is None:
        if not _fits(data_cfg, key, files, resize):
            return None
        workers = available_cores()

        def make(tmp: Path) -> dict:
            n = sum(len(p) for p in files.values())
            log.info(
                "building the tile store %s: decoding %d images (%s) with %d threads",
                key,
                n,
                _amount(_needed[key]),
                workers,
            )
            return _meta(key, resize, write_store(files, resize, tmp, workers, stamps=stamps))

        with faults.writing(root, need=_needed[key]):
            meta = sealed.build_once(root, key, make, what="tile store", log=log, validate=_fields, checked=True)
    return Store(key, path, meta)


def check_and_store(data_cfg, listing, *, crop_size: int, resize: int | None):
    """For ``images.image_checks(decode=...)``: a decode that checks the files it is given and, when a
    store is to be built (``data.tile_store=auto`` and it fits), decodes every listed file once for
    both, building the tile store of the good ones (at least ``crop_size`` after ``resize``): a data
    set's first job decodes each image once. Nothing is read until a check is missing."""
    if _choice(data_cfg) == "off":
        return None
    every = {s: list(listing.files[s]) for s in listing.files}

    def decode_all(missing: list[Path]) -> dict:
        if not _fits(data_cfg, f"listed:{key_of(every, resize, listing.stamps)}", every, resize):
            return inspect_all(missing)
        results: dict[str, list | str] = {}

        def decode_one(path: Path):
            image, result = inspect(path)
            results[str(path)] = result
            if reason(result, crop_size) is not None:
                return None
            return np.asarray(crops.resized(image, resize))

        root = root_of(data_cfg)
        built = Path(tempfile.mkdtemp(prefix=".checked-", dir=root))
        need = _needed.get(f"listed:{key_of(every, resize, listing.stamps)}", 0)
        try:
            with faults.writing(root, need=need):  # a full disk is named as one, whatever numpy raised
                log.info(
                    "checking %d images and building their tile store from the same decode",
                    sum(map(len, every.values())),
                )
                stats = write_store(every, resize, built, decode_one=decode_one, stamps=listing.stamps)
                key = key_of(stats["kept"], resize, listing.stamps)

                def make(tmp: Path) -> dict:
                    for f in built.iterdir():
                        f.rename(tmp / f.name)
                    return _meta(key, resize, stats)

                sealed.build_once(root, key, make, what="tile store", log=log, validate=_fields)
        finally:
            shutil.rmtree(built, ignore_errors=True)
        return results

    return decode_all
