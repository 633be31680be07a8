"""Batches built from decoded pixels, on the training device: no decoding, no DataLoader workers.

Per batch: the crops are copied out of the tile store's memory map and turned into a normalised
float batch (``Batcher``): on CUDA into a pinned uint8 buffer in a background thread, sent to the
device in one non-blocking copy and normalised there; on the CPU converted and normalised as they
are copied, in turn with the model. The crop of training image ``i`` at epoch ``e`` is
``crops.crop_offset(crop_seed, i, crops.view_of(e))`` and its flips/rotation ``crops.augment_ops`` of
the same triple, exactly as the PIL path draws them, and both paths normalise by ``crops.Normalise``,
so both give the same batches. When the whole split fits on the device
(``data.tile_store_device``), it is kept there and a batch is one gather on the device.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from resnet_sweep.data import crops

log = logging.getLogger(__name__)


class Batcher:
    """uint8 HxWx3 crops become one normalised float batch (N, 3, H, W) in NHWC memory
    (channels_last), by ``crops.Normalise`` as the PIL path's crops are.

    On the CPU each crop is converted straight from where it lies (the tile store's memory map, a
    decoded image) into a preallocated float buffer and normalised there while it is in the core's
    cache. The store's training pipeline on the CI machine went from about 113 to 68 us per 224-px
    crop (CPU time, everything included) against a uint8 copy made by a second thread and then
    converted and normalised per two crops by the first. A fresh 38 MB tensor per batch would cost
    more in page faults than the arithmetic (about 17 ms against 4 ms per 64 crops). On CUDA the
    crops are copied into a pinned uint8 buffer, sent in one non-blocking copy and normalised on the
    device; an event recorded after the copy guards the buffer until the copy has read it."""

    def __init__(self, size: int, crop: int, mean, std, device: torch.device):
        cuda = device.type == "cuda"
        self.normalise = crops.Normalise(mean, std, device)
        if cuda:
            self.buf = torch.empty((size, crop, crop, 3), dtype=torch.uint8, pin_memory=True)
            self.slots = self.buf.numpy()  # the same memory: a numpy copy per crop is the cheapest
            self.copied = torch.cuda.Event()
        else:
            with torch.inference_mode(False):  # reused by training after an evaluation made it
                self.out = torch.empty((size, crop, crop, 3), dtype=torch.float32)
            self.slots = self.out.numpy()
            self.copied = None
        self.device, self.n = device, 0

    def ready(self) -> None:
        """Wait until the previous batch's copy to the device has read the buffer (CUDA only)."""
        if self.copied is not None:
            self.copied.synchronize()

    def add(self, crop: np.ndarray) -> None:
        if self.copied is not None:
            self.slots[self.n] = crop
        else:  # numpy converts any strides (a window of the map, flipped or turned) in one pass
            np.copyto(self.slots[self.n], crop, casting="unsafe")
            self.normalise(self.out[self.n : self.n + 1])
        self.n += 1

    def take(self) -> torch.Tensor:
        """The batch so far. It is a view of a reused buffer: use it before the next ``take`` of this
        batcher."""
        n, self.n = self.n, 0
        if self.copied is None:
            return self.out[:n].permute(0, 3, 1, 2)
        x = self.buf[:n].to(self.device, non_blocking=True)
        self.copied.record()
        return self.normalise(x.float()).permute(0, 3, 1, 2)


class StoreLoader:
    """(images, labels) batches of one split from the tile store, in the order and with the crops
    the PIL loader (``crops.Tiles`` + ``crops.EpochShuffle``) would give: training shuffles by
    ``crops.shuffled(seed, epoch)`` and crops by ``crops.crop_offset``; evaluation takes the centre
    crop in order. ``resident``: the split's (N, H, W, 3) array lives on the device."""

    def __init__(
        self,
        images,
        labels,
        crop: int,
        mean,
        std,
        batch_size: int,
        device: torch.device,
        seed: int | None = None,
        crop_seed: int | None = None,
        augment=(),
        resident: bool = False,
        sampler: str = "shuffle",
    ):
        self.images, self.crop, self.mean, self.std = images, int(crop), mean, std
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.batch_size, self.device = int(batch_size), device
        self.seed, self.crop_seed, self.augment = seed, crop_seed, tuple(augment or ())
        self.sampler, self.epoch = sampler, 0
        self.sizes = [images.size(i) for i in range(len(images))]
        self.on_device, self.buffers = None, None
        if resident:
            uniform = images.uniform()
            if uniform is None:
                raise ValueError("a resident store needs images of one size")
            self.on_device = torch.from_numpy(np.array(uniform)).to(device)  # a writable copy, then on the device
            self.normalise = crops.Normalise(mean, std, device)

    @property
    def training(self) -> bool:
        return self.crop_seed is not None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def _order(self) -> np.ndarray:
        n = len(self.labels)
        return (
            crops.epoch_order(self.labels.numpy(), self.seed, self.epoch, self.sampler)
            if self.training
            else np.arange(n)
        )

    def _windows(self) -> list[tuple[int, int, tuple]]:
        """(top, left, augmentation) of every image this epoch, drawn at once (``crops.train_windows``)."""
        if not self.training:
            return [(*crops.centre_offset(size, self.crop), ()) for size in self.sizes]
        view = crops.view_of(self.epoch)
        return crops.train_windows(
            self.sizes, self.crop, self.crop_seed, np.arange(len(self.sizes)), view, self.augment
        )

    def _fill(self, batcher: Batcher, idx: np.ndarray, windows) -> None:
        batcher.ready()
        batcher.n = 0
        c = self.crop
        for i in idx.tolist():
            top, left, ops = windows[i]
            crop = self.images.crop(i, left, top, c)
            batcher.add(crops.apply_augment(crop, ops) if ops else crop)

    def __iter__(self):
        order, windows = self._order(), self._windows()
        batches = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        if self.on_device is not None:
            for idx in batches:
                yield self._gather_on_device(idx, windows), self.labels[idx]
            return
        if self.device.type != "cuda":
            # made in turn: a thread beside the model would compete with torch's threads for the same
            # cores, and the crops would cross cores (both measured slower). Two buffers kept from
            # pass to pass (fresh ones would be page-faulted in again every epoch): a batch stays
            # intact while the next one is made.
            if self.buffers is None:
                self.buffers = [Batcher(self.batch_size, self.crop, self.mean, self.std, self.device) for _ in range(2)]
            for k, idx in enumerate(batches):
                self._fill(self.buffers[k % 2], idx, windows)
                yield self.buffers[k % 2].take(), self.labels[idx]
            return
        # two buffers of this pass's own (an abandoned pass may still be closing): one trains while the
        # other is filled
        buffers = [Batcher(self.batch_size, self.crop, self.mean, self.std, self.device) for _ in range(2)]
        pool = ThreadPoolExecutor(1, thread_name_prefix="tile-store")
        try:
            pending = pool.submit(self._fill, buffers[0], batches[0], windows) if batches else None
            for k, idx in enumerate(batches):
                pending.result()
                if k + 1 < len(batches):  # the next batch is gathered while this one trains
                    pending = pool.submit(self._fill, buffers[(k + 1) % 2], batches[k + 1], windows)
                yield buffers[k % 2].take(), self.labels[idx]
        finally:  # Ctrl-C / SIGTERM / an early stop: no thread left behind
            pool.shutdown(wait=True, cancel_futures=True)

    def _gather_on_device(self, idx: np.ndarray, windows) -> torch.Tensor:
        """One advanced-indexing gather of every crop of the batch from the device-resident split."""
        return gather_crops(self.on_device, idx, [windows[i] for i in idx.tolist()], self.crop, self.normalise)


def gather_crops(images: torch.Tensor, index, windows, crop: int, normalise: crops.Normalise) -> torch.Tensor:
    """The normalised (B, 3, crop, crop) batch (NHWC memory) of crop ``windows[k] = (top, left, ops)``
    of image ``index[k]`` of the uint8 ``(M, H, W, 3)`` tensor ``images``, made where ``images`` is:
    one advanced-indexing gather, the flips/turns, then ``normalise``. The indices travel in one copy."""
    where = torch.as_tensor(np.asarray([[int(i), w[0], w[1]] for i, w in zip(index, windows)], dtype=np.int64))
    if images.device.type == "cuda":  # pinned, so the copy does not wait for the work queued before it
        where = where.pin_memory().to(images.device, non_blocking=True)
    span = torch.arange(crop, device=images.device)
    rows, cols = where[:, 1:2] + span, where[:, 2:3] + span
    x = images[where[:, 0, None, None], rows[:, :, None], cols[:, None, :]]  # (B, crop, crop, 3) uint8
    if any(w[2] for w in windows):
        x = torch.stack([crops.apply_augment_tensor(x[k], w[2]) if w[2] else x[k] for k, w in enumerate(windows)])
    return normalise(x.float()).permute(0, 3, 1, 2)


class RowBatches:
    """Whole images of one size, ``rows[i0:i1]`` of an (N, H, W, 3) uint8 memory map, sent to the
    device a batch at a time: one memcpy into a pinned buffer, one non-blocking copy (CUDA), then the
    crops are cut there (``gather_crops``). The feature bank's extraction on a GPU, where cropping
    each image on the CPU would leave the GPU waiting (measured on an H200: 44% of plain inference).
    ``depth`` buffers in rotation: a buffer is refilled only after its copy to the device has read it."""

    def __init__(self, images: int, height: int, width: int, device: torch.device, depth: int = 3):
        cuda = device.type == "cuda"
        self.bufs = [torch.empty((images, height, width, 3), dtype=torch.uint8, pin_memory=cuda) for _ in range(depth)]
        self.copied = [torch.cuda.Event() if cuda else None for _ in range(depth)]
        self.device, self.k = device, 0

    def send(self, rows: np.ndarray) -> torch.Tensor:
        """``rows`` (M <= images of H x W x 3) on the device; on the CPU a copy."""
        j, self.k = self.k % len(self.bufs), self.k + 1
        if self.copied[j] is not None:
            self.copied[j].synchronize()
        buf = self.bufs[j][: len(rows)]
        buf.numpy()[...] = rows
        if self.copied[j] is None:
            return buf
        on_device = buf.to(self.device, non_blocking=True)
        self.copied[j].record()
        return on_device


def prefetched(items, depth: int = 1):
    """The items of the iterator ``items``, produced one ``depth`` ahead in a background thread (torch
    and numpy release the GIL while they copy and compute). Closing the generator, or an exception
    (Ctrl-C included) in the consumer, stops the producer at its next item; its errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to put
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
