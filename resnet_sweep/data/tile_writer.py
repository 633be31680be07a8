"""A tile store written: every image of ``files`` decoded by a thread pool, in the loaders' order,
into ``<split>.u8`` (HxWx3 uint8 images one after another) and ``<split>.index.npy`` (offset, height,
width of each); a file changed since the sweep listed it, or one that does not decode, is one line."""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.data import crops
from resnet_sweep.data.cores import available as available_cores
from resnet_sweep.data.images import load_rgb


def decode(path: Path, resize: int | None) -> np.ndarray:
    """The image as the loaders see it, HxWx3 uint8."""
    return np.asarray(crops.resized(load_rgb(path), resize))


class Changed(Exception):
    """An image's size or mtime is not what the sweep listed: a store built now would not hold what its key says."""


def unchanged(path: Path, stamps: dict | None) -> None:
    """Raises ``Changed`` when ``path`` differs (size, mtime) from its stamp as listed (``image_folder.Listing.stamps``)."""
    if stamps is None:
        return
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != tuple(stamps[str(path)][1:]):
        raise Changed(str(path))


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
