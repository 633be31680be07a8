"""One split's batches: from the decoded tile store where there is one (``TileStore``, opened at
first use), else decoded by PIL in a DataLoader whose workers start the platform's standard way."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch

from resnet_sweep.core import faults
from resnet_sweep.data.crops import Loader, Tiles
from resnet_sweep.data.image_folder import split_fingerprint


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


class TileStore:
    """The data set's decoded tile store (``tiles.get``), opened at first use and shared by the
    three splits' loaders and the feature bank's extraction; ``None`` images where there is none
    (``data.tile_store=off``, or too large: ``tiles`` says why in one line)."""

    def __init__(self, data_cfg, files: dict[str, list[Path]], resize, device: torch.device, *, listing=None):
        self.data_cfg, self.files, self.resize, self.device = data_cfg, files, resize, device
        self.listing = listing  # image_folder.Listing: the store's key without stat-ing every file again
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
