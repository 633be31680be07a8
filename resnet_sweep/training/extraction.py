"""The feature bank's extraction: the frozen backbone run once over every crop the bank holds (V
training views per image, one centre crop per valid/test image), decoded by threads or copied from
the tile store, cut on the host or on the device, written as fp16 arrays (fp32 if a feature exceeds
fp16's range)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resnet_sweep.config import checks
from resnet_sweep.core import faults
from resnet_sweep.data import crops, tile_writer
from resnet_sweep.data.batches import Batcher, RowBatches, gather_crops, prefetched
from resnet_sweep.training.hardware import autocast, uses_bf16

log = logging.getLogger(__name__)


def extract_batch(cfg, device: torch.device) -> int:
    """``trainer.bank_batch_size`` (checked by ``checks.check_config``), or the device's
    ``checks.EXTRACT_BATCH`` when it is null."""
    value = cfg.trainer.bank_batch_size
    return default_extract_batch(device) if value is None else int(value)


def default_extract_batch(device: torch.device) -> int:
    return checks.EXTRACT_BATCH.get(device.type, checks.EXTRACT_BATCH["cpu"])


def _decoded(paths: list[Path], resize, workers: int, ahead: int):
    """The decoded images in order, decoded by ``workers`` threads up to ``ahead`` images ahead of
    the backbone (PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for path in paths:
            pending.append(pool.submit(tile_writer.decode, path, resize))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _batch(crops: list[np.ndarray], mean, std, device: torch.device) -> torch.Tensor:
    batcher = Batcher(len(crops), crops[0].shape[0], mean, std, device)
    for c in crops:
        batcher.add(c)
    return batcher.take()


def _bf16_ok(backbone: nn.Module, sample: torch.Tensor, device: torch.device) -> bool:
    """bf16 features must agree with fp32 (cosine >= 0.999 per image) to be used."""
    with torch.inference_mode():
        ref = backbone(sample.to(device)).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = backbone(sample.to(device)).float()
    cosine = F.cosine_similarity(ref, low, dim=1).min().item()
    log.info("bf16 vs fp32 feature cosine (min over %d images): %.5f", len(sample), cosine)
    return cosine >= 0.999


def _crop_batches(images, files, views: int, crop: int, seed: int, augment, batchers: list, batch_size: int):
    """``(split, normalised batch, [(view, image)...])`` for every batch of the bank, in order: every
    training image's ``views`` crops (and flips/turns), every valid/test image's centre crop. The
    batchers are used in rotation, so a batch stays intact while the next two are made."""
    k = 0
    for split in checks.SPLITS:
        n_views = views if split == "train" else 1
        batcher, where = batchers[k % len(batchers)], []
        batcher.ready()
        batcher.n = 0
        for i in range(len(files[split])):
            image = next(images)
            size = (image.shape[1], image.shape[0])
            for v in range(n_views):
                top, left = (
                    crops.crop_offset(size, crop, seed, i, v) if split == "train" else crops.centre_offset(size, crop)
                )
                window = image[top : top + crop, left : left + crop]
                ops = crops.augment_ops(augment, seed, i, v) if split == "train" else ()
                batcher.add(crops.apply_augment(window, ops) if ops else window)
                where.append((v, i))
                if len(where) == batch_size or (i == len(files[split]) - 1 and v == n_views - 1):
                    yield split, batcher.take(), where
                    k += 1
                    batcher, where = batchers[k % len(batchers)], []
                    batcher.ready()
                    batcher.n = 0


def _device_crop_batches(
    store, files, views: int, crop: int, seed: int, augment, normalise, batch_size: int, device: torch.device
):
    """``_crop_batches``, cut on ``device`` from whole images (``batches.RowBatches``): the same
    batches, crops and flips/turns, for a store whose splits each hold images of one size. Each batch
    comes as ``(x, event)``: on CUDA ``x`` is ready once ``event`` (on a side stream) has passed."""
    # on CUDA the copies and crops run on a stream of their own, so they overlap the backbone's work
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    senders: dict[tuple[int, int], RowBatches] = {}
    for split in checks.SPLITS:
        rows = store.images(split).uniform()
        n_views = views if split == "train" else 1
        entries = [(v, i) for i in range(len(files[split])) for v in range(n_views)]
        if not entries:
            continue
        size = (rows.shape[2], rows.shape[1])
        if size not in senders:  # pinned buffers are slow to allocate: one set for every split of a size
            senders[size] = RowBatches(batch_size, rows.shape[1], rows.shape[2], device)
        sender = senders[size]
        for k in range(0, len(entries), batch_size):
            where = entries[k : k + batch_size]
            first, last = where[0][1], where[-1][1]
            if split == "train":
                windows = crops.train_windows(size, crop, seed, [i for _, i in where], [v for v, _ in where], augment)
            else:
                windows = [(*crops.centre_offset(size, crop), ())] * len(where)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                images = sender.send(rows[first : last + 1])
                x = gather_crops(images, [i - first for _, i in where], windows, crop, normalise)
                made = side.record_event() if side is not None else None
            yield split, (x, made), where


def _reserve(path: Path) -> None:
    """Allocate the (sparse) file's blocks (ENOSPC when they are not there), where the file system can."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def extract(
    backbone: nn.Module,
    files: dict[str, list[Path]],
    labels: dict[str, list[int]],
    crop: int,
    mean,
    std,
    views: int,
    seed: int,
    device: torch.device,
    out: Path,
    batch_size: int | None = None,
    resize=None,
    store=None,
    augment=(),
    device_crops: bool | None = None,
) -> dict:
    """Run the frozen backbone once over every crop the bank holds; write fp16 arrays to ``out``.
    ``batch_size`` crops per forward (None: the device's ``checks.EXTRACT_BATCH``). ``store`` (a ``tile_reader.Store`` of
    these files): crops are copied from its decoded pixels instead of decoding every image.
    ``augment``: each training view's flips/turns, as the training loops draw them. ``device_crops``
    (None: on CUDA when every split of ``store`` holds images of one size): whole images go to the
    device a batch at a time and the crops are cut there (``_device_crop_batches``)."""
    batch_size = batch_size or default_extract_batch(device)
    backbone = backbone.to(device).eval().to(memory_format=torch.channels_last)
    dim = None
    use_bf16 = False
    if uses_bf16(device, "auto"):  # where the hardware runs it fast, and only if its features agree
        first = (
            [store.images("train").image(i) for i in range(min(8, len(files["train"])))]
            if store is not None
            else [tile_writer.decode(p, resize) for p in files["train"][:8]]
        )
        use_bf16 = _bf16_ok(backbone, _batch([image[:crop, :crop] for image in first], mean, std, device), device)
    precision = "bf16" if use_bf16 else "32"
    batcher = Batcher(batch_size, crop, mean, std, device)
    total, started = 0, time.perf_counter()  # extraction proper: decode, crop, forward, store
    peak = [0.0]  # largest |feature|: fp16 holds up to 65504
    # one stream over every split, decoded a batch of images ahead of the backbone (so the next
    # split's first images are ready too); on a GPU the backbone waits for the CPU, so decode with
    # every spare core
    workers = max(1, (os.cpu_count() or 2) - 1) if device.type == "cuda" else 1
    if store is not None:  # decoded once already: views of the memory map
        stream = (store.images(s).image(i) for s in checks.SPLITS for i in range(len(files[s])))
    else:
        stream = _decoded([p for s in checks.SPLITS for p in files[s]], resize, workers, ahead=batch_size)
    if device_crops is None:
        device_crops = (
            device.type == "cuda"
            and store is not None
            and all(store.images(s).uniform() is not None or not files[s] for s in checks.SPLITS)
        )
    if device_crops:
        produced = _device_crop_batches(store, files, views, crop, seed, augment, batcher.normalise, batch_size, device)
    else:
        batchers = [batcher] + [Batcher(batch_size, crop, mean, std, device) for _ in range(2)]
        produced = _crop_batches(stream, files, views, crop, seed, augment, batchers, batch_size)
    arrays: dict[str, np.ndarray] = {}
    # on CUDA the next batch is cropped and normalised in a thread while the GPU runs this one; on
    # the CPU that thread would compete with torch's for the same cores (measured: 89% of plain
    # inference instead of 94%), so batches are made in turn
    ahead = prefetched(produced) if device.type == "cuda" else produced
    with contextlib.closing(stream), contextlib.closing(ahead) as batches:
        for split, x, where in batches:
            if isinstance(x, tuple):  # made on a side stream: wait for it there, keep its memory until used
                x, made = x
                if made is not None:
                    torch.cuda.current_stream(device).wait_event(made)
                    x.record_stream(torch.cuda.current_stream(device))
            with torch.inference_mode(), autocast(device, precision):
                f = backbone(x).float().cpu().numpy()
            peak[0] = max(peak[0], float(np.abs(f).max()))
            if split not in arrays:
                dim = f.shape[1]
                n = len(files[split])
                shape = (views, n, dim) if split == "train" else (n, dim)
                # the whole bank's bytes (fp32 while extracting, fp16 after); the file's blocks taken
                # now: a full disk is ENOSPC here, not SIGBUS on a page of the map
                need = sum(len(files[s]) * (views if s == "train" else 1) for s in checks.SPLITS) * dim * 6
                with faults.writing(out.parent, need=need):
                    arrays[split] = np.lib.format.open_memmap(
                        out / f"{split}.f32.npy", mode="w+", dtype=np.float32, shape=shape
                    )
                    _reserve(out / f"{split}.f32.npy")
            v, i = np.asarray(where).T
            if split == "train":
                arrays[split][v, i] = f
            else:
                arrays[split][i] = f
            total += len(where)
    for split in checks.SPLITS:
        arrays.pop(split).flush()
        np.save(out / f"{split}_labels.npy", np.asarray(labels[split], dtype=np.int64))
    seconds = time.perf_counter() - started
    # fp16 on disk halves the bank; features beyond its range (e.g. a randomly initialised deep
    # ResNet) stay fp32 rather than overflow to inf
    dtype = np.float16 if peak[0] < 60000 else np.float32
    if dtype is np.float32:
        log.warning("features reach %.3g, beyond fp16: the bank is stored in fp32", peak[0])
    for split in checks.SPLITS:
        full = np.load(out / f"{split}.f32.npy", mmap_mode="r")
        np.save(out / f"{split}.npy", full.astype(dtype))
        del full
        (out / f"{split}.f32.npy").unlink()
    return {
        "dim": dim,
        "crops": total,
        "seconds": round(seconds, 3),
        "img_per_s": round(total / seconds, 1),
        "precision": precision,
        "batch": batch_size,
        "device": str(device),
        "dtype": np.dtype(dtype).name,
        "max_abs": round(peak[0], 3),
    }
