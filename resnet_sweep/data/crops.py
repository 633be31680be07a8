"""What a training or evaluation image becomes: its crop (a pure function of the crop seed, the
image and the view), its flips and quarter turns (``data.augment``), the epoch's order, and the
PIL-decoding DataLoader that serves them when there is no tile store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from resnet_sweep.core import draws
from resnet_sweep.data.images import load_rgb


def eval_transform(crop: int, mean, std, resize: int | None = None) -> transforms.Compose:
    steps = [transforms.Resize(resize)] if resize else []
    return transforms.Compose(steps + [transforms.CenterCrop(crop), ToNormalised(mean, std)])


class Normalise:
    """Every crop's normalisation, on both paths (the PIL loaders' ``ToNormalised`` and the tile
    store's batches): in place on an NHWC float tensor of 0..255 values (mean/std per channel, the
    last dim), one fused multiply-add ``x * 1/(255 std) - mean/std``. That is torchvision's
    ``to_tensor`` + ``normalize`` (``(x / 255 - mean) / std``) up to fp32 rounding (at most 5e-7), in
    one pass instead of three: converting a 224-px crop and normalising it takes 25 us on one core
    of the CI machine this way, 70 us torchvision's way. Both paths using this one rule is what makes
    their batches on a CPU equal bit for bit (`tests/test_batches.py`; on CUDA the store's
    multiply-add may round differently in the last place).

    The per-channel constants are applied as one image row's pattern (``W`` copies, ``W * 3``
    contiguous values) to the batch seen as ``(N * H, W * 3)`` rows: the same arithmetic on the same
    values, but the pass runs over long contiguous rows (broadcasting a 3-long last dimension made
    each pass about 3x slower on a CPU)."""

    def __init__(self, mean, std, device):
        mean, std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
        self.scale, self.bias = (1 / (255 * std)).float().to(device), (-mean / std).float().to(device)
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _row(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if width not in self.rows:
            self.rows[width] = (self.scale.repeat(width), self.bias.repeat(width))
        return self.rows[width]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous():
            rows = x.view(-1, x.shape[-2] * x.shape[-1])
            a, b = self._row(x.shape[-2])
        else:  # broadcast over the channels as they lie
            rows, a, b = x, *self._row(1)
        torch.addcmul(b, rows, a, out=rows)
        return x


class ToNormalised:
    """A PIL image or HxWx3 uint8 array -> its normalised (3, H, W) float tensor by ``Normalise``, as
    the tile store's batches are: what the PIL path (loaders, predict) uses in place of
    torchvision's ``to_tensor`` + ``normalize``."""

    def __init__(self, mean, std):
        self.normalise = Normalise(mean, std, torch.device("cpu"))

    def __call__(self, image) -> torch.Tensor:
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).float()
        return self.normalise(x[None])[0].permute(2, 0, 1)


# ---------------------------------------------------------------- the training crops, shared with the feature bank
# A training image's random crop is a pure function of (crop seed, image index, view), and epoch e uses view
# view_of(e); batches are shuffled by (run seed, epoch). The naive loop and the feature bank draw from the
# same functions, so with trainer.bank_views >= max_epochs the bank reproduces the naive loop crop for crop,
# and a resumed job draws exactly what an uninterrupted one would.


def view_of(epoch: int) -> int:
    """Epoch 0 (measuring the untrained model) uses view 0; training epoch e >= 1 uses view e - 1."""
    return max(int(epoch) - 1, 0)


def crop_offset(size: tuple[int, int], crop: int, seed: int, index: int, view: int) -> tuple[int, int]:
    """(top, left) of the random ``crop`` x ``crop`` window of training image ``index`` (``size`` = (w, h))."""
    w, h = size
    rng = np.random.default_rng([int(seed), int(index), int(view)])
    return int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))


def centre_offset(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(top, left) of the centre ``crop`` x ``crop`` window (``size`` = (w, h)), rounded as torchvision's
    center_crop rounds."""
    w, h = size
    return round((h - crop) / 2.0), round((w - crop) / 2.0)


def augment_ops(augment, seed: int, index: int, view: int) -> tuple:
    """The flips and rotation (``data.augment``) of training image ``index`` at ``view``: a pure
    function of (crop seed, image, view), like its crop, drawn from a stream of its own.
    Returns ``(hflip, vflip, quarter turns)``, or ``()`` when ``augment`` is empty."""
    if not augment:
        return ()
    rng = np.random.default_rng([int(seed), int(index), int(view), 1])
    hflip, vflip, turns = bool(rng.integers(2)), bool(rng.integers(2)), int(rng.integers(4))
    return ("hflip" in augment and hflip, "vflip" in augment and vflip, turns if "rot90" in augment else 0)


def apply_augment(crop: np.ndarray, ops: tuple) -> np.ndarray:
    """``ops`` (augment_ops) on an HxWx3 crop: horizontal flip, vertical flip, then quarter turns
    counter-clockwise. Views where possible; the batcher copies them."""
    hflip, vflip, turns = ops
    if hflip:
        crop = crop[:, ::-1]
    if vflip:
        crop = crop[::-1]
    return np.rot90(crop, turns, axes=(0, 1)) if turns else crop


def apply_augment_tensor(crop: torch.Tensor, ops: tuple) -> torch.Tensor:
    """``apply_augment`` on an HxWx3 tensor (on any device)."""
    hflip, vflip, turns = ops
    if hflip:
        crop = crop.flip(1)
    if vflip:
        crop = crop.flip(0)
    return torch.rot90(crop, turns, dims=(0, 1)) if turns else crop


def train_windows(sizes, crop: int, seed: int, indices, views, augment=()) -> list[tuple[int, int, tuple]]:
    """``(top, left, ops)`` of training image ``indices[k]`` at view ``views[k]`` (an int: the same for
    all), of size ``sizes[k]`` (or one ``(w, h)`` for all): ``crop_offset`` and ``augment_ops`` for many
    crops at once, equal to them crop for crop (``draws.integers``: about 1 us per crop instead of
    12 us, which a GPU's loader would spend in the thread that feeds it)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(indices)
    views = np.broadcast_to(np.asarray(views, dtype=np.int64), (n,))
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64).reshape(-1, 2), (n, 2))
    keys = np.stack([np.full(n, int(seed), dtype=np.int64), indices, views], axis=1)
    offsets = draws.integers(keys, np.stack([sizes[:, 1] - crop + 1, sizes[:, 0] - crop + 1], axis=1)).tolist()
    if not augment:
        return [(top, left, ()) for top, left in offsets]
    flips = draws.integers(np.concatenate([keys, np.ones((n, 1), dtype=np.int64)], axis=1), [2, 2, 4]).tolist()
    h, v, r = "hflip" in augment, "vflip" in augment, "rot90" in augment
    return [
        (top, left, (h and bool(a), v and bool(b), c if r else 0)) for (top, left), (a, b, c) in zip(offsets, flips)
    ]


def shuffled(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch`` for run seed ``seed``."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def epoch_order(labels, seed: int, epoch: int, sampler: str = "shuffle") -> np.ndarray:
    """The training samples of one epoch (``data.sampler``). ``shuffle``: every sample once, in the
    order ``shuffled(n, seed, epoch)``. ``balanced``: as many draws, with replacement, each class
    equally likely at every draw (a sample's weight is 1 / its class's count), reproducible from
    (seed, epoch); rare-class samples repeat, common ones are left out of some epochs."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if sampler == "shuffle":
        return shuffled(n, seed, epoch)
    if sampler != "balanced":
        raise ValueError(f"data.sampler={sampler}: choose shuffle or balanced")
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return np.random.default_rng([int(seed), int(epoch), 1]).choice(n, size=n, replace=True, p=weights / weights.sum())


def resized(image: Image.Image, resize: int | None) -> Image.Image:
    return TF.resize(image, resize) if resize else image


class Tiles(Dataset):
    """(image, label) of one split. With ``crop_seed`` (training): the random crop of (image, epoch) from
    crop_offset; without (evaluation): the centre crop. ``epoch`` is set by the loader's set_epoch."""

    def __init__(self, samples: list[tuple[Path, int]], crop: int, mean, std, resize=None, crop_seed=None, augment=()):
        self.samples, self.crop, self.to_tensor = samples, crop, ToNormalised(mean, std)
        self.resize, self.crop_seed, self.epoch, self.augment = resize, crop_seed, 0, tuple(augment or ())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = resized(load_rgb(path), self.resize)
        ops = ()
        if self.crop_seed is None:
            top, left = centre_offset(image.size, self.crop)
        else:
            top, left = crop_offset(image.size, self.crop, self.crop_seed, i, view_of(self.epoch))
            ops = augment_ops(self.augment, self.crop_seed, i, view_of(self.epoch))
        image = TF.crop(image, top, left, self.crop, self.crop)
        if ops:
            image = apply_augment(np.asarray(image), ops)
        return self.to_tensor(image), label


class EpochShuffle(Sampler):
    """The training order of each epoch: ``epoch_order(labels, seed, epoch, sampler)``."""

    def __init__(self, labels, seed: int, sampler: str = "shuffle"):
        self.labels, self.seed, self.sampler, self.epoch = list(labels), seed, sampler, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(epoch_order(self.labels, self.seed, self.epoch, self.sampler).tolist())


class Loader(DataLoader):
    """A DataLoader whose crops and order follow ``set_epoch`` (called by the training loop)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch
        if isinstance(self.sampler, EpochShuffle):
            self.sampler.epoch = epoch
