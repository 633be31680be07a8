"""A tile store read: each split's decoded images memory-mapped (``SplitImages``: views, never
copies), for a whole, verified store (``Store``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
