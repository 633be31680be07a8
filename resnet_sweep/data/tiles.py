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
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torchvision
from PIL import Image
from tqdm import tqdm

from resnet_sweep.core import faults, sealed
from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.core.registry import PROCESS
from resnet_sweep.data import crops
from resnet_sweep.data.cores import available as available_cores
from resnet_sweep.data.images import fingerprint, inspect, inspect_all, load_rgb, reason

log = logging.getLogger(__name__)

TILES_VERSION = 1  # the decode rules: crops.resized(load_rgb(path), resize), HxWx3 uint8
GB = 1e9

# key -> bytes of its decoded images, from the headers: read once per process (the jobs a launcher runs
# one after another in one process, on data too large for a store, read the headers once)
_needed: dict[str, int] = PROCESS.state("tiles.needed")


def decode(path: Path, resize: int | None) -> np.ndarray:
    """The image as the loaders see it, HxWx3 uint8."""
    return np.asarray(crops.resized(load_rgb(path), resize))


class Changed(Exception):
    """An image's size or mtime is not what the sweep listed: a store built now would not hold what its key says."""


def unchanged(path: Path, stamps: dict | None) -> None:
    """Raises ``Changed`` when ``path`` differs (size, mtime) from its stamp as listed (``images.Listing.stamps``)."""
    if stamps is None:
        return
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != tuple(stamps[str(path)][1:]):
        raise Changed(str(path))


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
    """The store's key; ``stamps`` (``images.Listing.stamps``) saves stat-ing and resolving every file,
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


class SplitImages:
    """The decoded images of one split, memory-mapped: views into the store, never copies.
    Pickles without its memory map (reopened on first use), so it can go to worker processes."""

    def __init__(self, path: Path, index: np.ndarray):
        self.path = Path(path)
        self._rows = [tuple(int(v) for v in row) for row in index]  # (offset, height, width)
        self._data = None
        self._uniform = None

    def __getstate__(self):
        return {**self.__dict__, "_data": None, "_uniform": None}

    def _bytes(self) -> np.ndarray:
        if self._data is None:
            if not self._rows:
                self._data = np.zeros(0, dtype=np.uint8)
            else:
                off, h, w = self._rows[-1]
                self._data = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(off + h * w * 3,))
        return self._data

    def __len__(self) -> int:
        return len(self._rows)

    def size(self, i: int) -> tuple[int, int]:
        """(width, height), as PIL's ``Image.size``."""
        _, h, w = self._rows[i]
        return w, h

    def uniform(self) -> np.ndarray | None:
        """The (N, H, W, 3) uint8 memmap view when every image has the same size, else None."""
        if self._uniform is None and self._rows:
            sizes = {(h, w) for _, h, w in self._rows}
            if len(sizes) == 1:
                ((h, w),) = sizes
                self._uniform = self._bytes().reshape(len(self._rows), h, w, 3)
        return self._uniform

    def image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 view of image ``i``."""
        off, h, w = self._rows[i]
        return self._bytes()[off : off + h * w * 3].reshape(h, w, 3)

    def crop(self, i: int, left: int, top: int, size: int) -> np.ndarray:
        """(size, size, 3) view of image ``i`` from (left, top); a window outside the image raises."""
        _, h, w = self._rows[i]
        if left < 0 or top < 0 or left + size > w or top + size > h:
            raise ValueError(f"crop ({left}, {top}, {size}x{size}) is outside image {i} of {self.path} ({w}x{h})")
        return self.image(i)[top : top + size, left : left + size]


class Store:
    """A whole, verified tile store: ``images(split)`` for each split it was built with."""

    def __init__(self, key: str, path: Path, meta: dict):
        self.key, self.path, self.meta = key, Path(path), meta
        self._splits: dict[str, SplitImages] = {}

    def images(self, split: str) -> SplitImages:
        if split not in self._splits:
            if split not in self.meta["splits"]:
                raise KeyError(f"tile store {self.path} has no split {split!r} (it has {list(self.meta['splits'])})")
            self._splits[split] = SplitImages(self.path / f"{split}.u8", np.load(self.path / f"{split}.index.npy"))
        return self._splits[split]


def _fields(meta: dict) -> None:
    for n in meta["splits"].values():
        int(n)


def _ordered(pool: ThreadPoolExecutor, paths: list[Path], work, ahead: int):
    """(path, future of ``work(path)``) in order, run by the pool up to ``ahead`` images ahead."""
    pending: deque = deque()
    for path in paths:
        pending.append((path, pool.submit(work, path)))
        if len(pending) > ahead:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def write_store(
    files: dict[str, list[Path]],
    resize: int | None,
    out: Path,
    workers: int | None = None,
    progress: bool | None = None,
    *,
    decode_one=None,
    stamps: dict | None = None,
) -> dict:
    """Decode every image of ``files`` into ``out`` (``<split>.u8`` and ``<split>.index.npy``) with
    ``workers`` threads (None: every core); return the stats for meta.json. ``progress``: tqdm's
    ``disable`` negated (None: a bar when stderr is a terminal). ``decode_one(path)`` (default
    ``decode(path, resize)``) may return None for an image to leave out: ``stats["kept"]`` lists the
    files stored per split. With ``stamps`` (as the files were listed), a file changed since is one
    line (UserError), and no store is made of it."""
    workers = workers or available_cores()
    total = sum(len(p) for p in files.values())
    stream = [p for s in files for p in files[s]]  # one stream: the next split's images decode early too
    nbytes: dict[str, int] = {}
    kept: dict[str, list[Path]] = {}
    started = time.perf_counter()
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="tile-decode") as pool,
        tqdm(
            total=total,
            unit="img",
            desc="decoding tiles",
            disable=None if progress is None else not progress,
            leave=False,
        ) as bar,
    ):
        decode_one = decode_one or (lambda p: decode(p, resize))

        def work(path: Path):
            unchanged(path, stamps)
            return decode_one(path)

        images = _ordered(pool, stream, work, ahead=4 * workers)
        try:
            for split, paths in files.items():
                rows, kept[split] = [], []
                offset = 0
                with open(out / f"{split}.u8", "wb") as f:
                    for _ in range(len(paths)):
                        path, done = next(images)
                        try:
                            image = done.result()
                        except Changed:
                            raise UserError(
                                f"{path}: changed since this sweep listed its data (size or modification "
                                "time); re-run the sweep, which lists the data afresh"
                            ) from None
                        except Exception as e:
                            why = first_line(e)
                            raise UserError(
                                f"{path}: cannot be read as an image ({why}) while building the tile "
                                "store; fix or remove it, or set data.tile_store=off"
                            ) from None
                        bar.update()
                        if image is None:
                            continue
                        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                            raise ValueError(f"{path} decoded to {image.dtype} {image.shape}, not HxWx3 uint8")
                        h, w = image.shape[:2]
                        rows.append((offset, h, w))
                        kept[split].append(path)
                        f.write(np.ascontiguousarray(image).data)
                        offset += image.nbytes
                np.save(out / f"{split}.index.npy", np.array(rows, dtype=np.int64).reshape(-1, 3))
                nbytes[split] = offset
        finally:
            images.close()
            pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - started
    return {
        "splits": {s: len(kept[s]) for s in files},
        "bytes": nbytes,
        "images": total,
        "seconds": round(seconds, 3),
        "img_per_s": round(total / max(seconds, 1e-9), 1),
        "workers": workers,
        "kept": kept,
    }


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
    (``images.Listing.stamps``): the files' stamps as listed, so none is stat-ed again; ``fingerprints``:
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
