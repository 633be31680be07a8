"""The embedded demo data set: synthetic H&E-like tiles of two classes (or three, ``data.classes=3``).

Tiles are rendered with the Beer-Lambert stain model (haematoxylin colours nuclei purple, eosin
colours stroma and cytoplasm pink) and differ in morphology:

- ``poorly_differentiated``: dense, small, round, dark nuclei with scant cytoplasm;
- ``differentiating``: sparser, larger, paler and more oval nuclei with a rim of pink cytoplasm and
  more fibrillary stroma between them;
- ``stroma`` (only with ``data.classes=3``): few, scattered nuclei in dense fibrillary eosin.

Each tile draws a differentiation level from a class-specific Beta distribution; the two
distributions overlap, so some tiles of one class look like the other and a linear probe cannot
reach 100% at once. Stain colours, stain intensity, magnification and focus vary per "slide", and
all tiles of one slide go to one split, as a group-aware split of real slides would do.

The tree is written to ``<cache_dir>/demo-<key>/{train,valid,test}/<class>/<slide>_<tile>.png`` and
read back by the same code as a user's folder. The key covers the generator version and every
parameter, so changing one makes a new tree; generation is atomic (temp dir + rename) and guarded
by a file lock, so parallel jobs build it once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from resnet_sweep.config.checks import SPLITS
from resnet_sweep.core import sealed

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3
CLASSES = ("differentiating", "poorly_differentiated")
THIRD_CLASS = "stroma"  # data.classes=3


def classes_of(data_cfg) -> tuple[str, ...]:
    """The demo's class folders for ``data.classes`` (2: the study's two; 3: plus stroma)."""
    n = data_cfg.classes
    if n not in (2, 3):
        from resnet_sweep.core.errors import UserError

        raise UserError(f"data.classes={n}: the demo data has 2 or 3 classes (3 adds {THIRD_CLASS})")
    return CLASSES if n == 2 else (*CLASSES, THIRD_CLASS)


# Ruifrok & Johnston optical-density vectors (RGB) of haematoxylin and eosin.
_H = np.array([0.650, 0.704, 0.286])
_E = np.array([0.072, 0.990, 0.105])


def ensure(data_cfg) -> Path:
    """Return the root of the demo ImageFolder tree, generating it on first use."""
    root, params = _root_and_params(data_cfg)
    cache, key = root.parent, root.name
    if (root / "params.json").exists():
        return root
    with sealed.folder_lock(cache, key):
        if (root / "params.json").exists():  # another job built it while we waited
            return root
        log.info("Generating the demo data set into %s (once)", root)

        def fill(tmp: Path) -> None:
            _generate(tmp, **{k: v for k, v in params.items() if k != "version"})
            (tmp / "params.json").write_text(json.dumps(params, indent=2))

        sealed.replace_folder(cache, key, fill)  # replaces a half-written tree from a killed run
    return root


def planned_files(data_cfg) -> tuple[Path, dict[str, list[Path]]]:
    """The demo's root and the files its generator writes there, by split (whether or not they exist
    yet): what ``data.group`` is checked against before the first run (``preflight``)."""
    root, params = _root_and_params(data_cfg)
    classes = classes_of(data_cfg)
    files = {
        split: [
            root / split / cls / tile_name(split, label, s, t)
            for label, cls in enumerate(classes)
            for s in range(n_slides)
            for t in range(params["tiles_per_slide"])
        ]
        for split, n_slides in zip(SPLITS, params["slides_per_class"])
    }
    return root, files


def tile_name(split: str, label: int, slide: int, tile: int) -> str:
    return f"slide{split[:2]}{label}{slide:02d}_tile{tile:03d}.png"


def _root_and_params(data_cfg) -> tuple[Path, dict]:
    params = {
        "version": GENERATOR_VERSION,
        "seed": int(data_cfg.seed),
        "tile_size": int(data_cfg.tile_size),
        "slides_per_class": [int(n) for n in data_cfg.slides_per_class],
        "tiles_per_slide": int(data_cfg.tiles_per_slide),
    }
    classes = classes_of(data_cfg)
    if len(classes) != 2:  # two classes keep their key (and cached trees) from before data.classes
        params["classes"] = list(classes)
    key = f"demo-{sealed.json_key(params, 12)}"  # slides_per_class: 3 numbers >= 1 (schema.DemoDataConf)
    return Path(os.path.expanduser(str(data_cfg.cache_dir))) / key, params


def _generate(out: Path, seed: int, tile_size: int, slides_per_class, tiles_per_slide: int, classes=CLASSES) -> None:
    rng = np.random.default_rng(seed)
    for split, n_slides in zip(SPLITS, slides_per_class):
        for label, cls in enumerate(classes):
            folder = out / split / cls
            folder.mkdir(parents=True)
            for s in range(n_slides):
                slide = _slide_params(rng)
                for t in range(tiles_per_slide):
                    tile = render_tile(rng, tile_size, cls, slide)
                    Image.fromarray(tile).save(folder / tile_name(split, label, s, t))


def _slide_params(rng: np.random.Generator) -> dict:
    """What varies between slides: stain colour and strength, magnification, focus."""

    def jitter(v):
        w = v + rng.normal(0, 0.03, 3)
        return np.clip(w, 0.01, None) / np.linalg.norm(w)

    return {
        "h_vec": jitter(_H),
        "e_vec": jitter(_E),
        "h_strength": rng.uniform(0.85, 1.15),
        "e_strength": rng.uniform(0.8, 1.2),
        "scale": rng.uniform(0.8, 1.25),
        "blur": rng.uniform(0.6, 1.6),
    }


def render_tile(rng: np.random.Generator, size: int, cls: str, slide: dict) -> np.ndarray:
    """One RGB uint8 tile. Morphology follows a per-tile differentiation level d in [0, 1]."""
    d = rng.beta(6, 2) if cls == "differentiating" else rng.beta(4, 4) if cls == THIRD_CLASS else rng.beta(2, 6)
    stroma = cls == THIRD_CLASS
    scale = slide["scale"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Eosin: stroma background with low-frequency variation and fibrillary streaks (more when
    # differentiated: neuropil).
    eosin = 0.25 + 0.15 * _smooth_noise(rng, size, 24) + rng.uniform(-0.05, 0.05)
    for _ in range(int(10 + 40 * d) + (80 if stroma else 0)):
        x0, y0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(20, 80)
        t = np.linspace(0, 1, int(length))
        px = np.clip(x0 + np.cos(angle) * length * t, 0, size - 1).astype(int)
        py = np.clip(y0 + np.sin(angle) * length * t + 6 * np.sin(6 * t), 0, size - 1).astype(int)
        eosin[py, px] += rng.uniform(0.1, 0.3)
    haem = 0.03 + 0.03 * _smooth_noise(rng, size, 12)

    # Cells: count falls, nucleus size, ovality, pallor and cytoplasm grow with differentiation.
    n_cells = int(rng.normal(140 - 95 * d, 12) / scale**2) // (6 if stroma else 1)
    for _ in range(max(n_cells, 5)):
        cx, cy = rng.uniform(-5, size + 5, 2)
        r = rng.normal(4.5 + 4.0 * d, 0.8) * scale
        r = max(r, 2.0)
        ecc = 1.0 + rng.uniform(0, 0.25 + 0.6 * d)
        theta = rng.uniform(0, np.pi)
        x0, x1 = int(max(cx - 3 * r, 0)), int(min(cx + 3 * r + 1, size))
        y0, y1 = int(max(cy - 3 * r, 0)), int(min(cy + 3 * r + 1, size))
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / (r * ecc)
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / r
        rr = u * u + v * v
        # cytoplasm: a pink rim around the nucleus, wider when differentiated
        cyto = rr < (1.0 + 1.8 * d) ** 2
        eosin[y0:y1, x0:x1][cyto] += 0.15 + 0.25 * d
        nucleus = rr < 1.0
        darkness = rng.normal(1.25 - 0.45 * d, 0.12)
        chromatin = 1 + 0.25 * rng.standard_normal(nucleus.sum())
        haem[y0:y1, x0:x1][nucleus] = np.maximum(haem[y0:y1, x0:x1][nucleus], darkness * chromatin)

    od = (
        slide["h_strength"] * haem[..., None] * slide["h_vec"]
        + slide["e_strength"] * np.clip(eosin, 0, None)[..., None] * slide["e_vec"]
    )
    rgb = 245.0 * np.exp(-od) + rng.normal(0, 3.0, (size, size, 3))
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(slide["blur"]))
    return np.asarray(img)


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    n = size // cell + 2
    coarse = rng.uniform(0, 255, (n, n)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((n * cell, n * cell), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)[:size, :size] / 127.5 - 1.0
