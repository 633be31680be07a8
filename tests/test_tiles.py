"""The decoded tile store (resnet_sweep.data.tiles): in-process, on tiny trees."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import threading
import time
from collections import namedtuple

import numpy as np
import pytest
from conftest import compose_cfg, make_tree
from omegaconf import OmegaConf
from PIL import Image

from resnet_sweep.config import checks
from resnet_sweep.core import sealed
from resnet_sweep.data import crops, images, tile_writer, tiles


def data_cfg(tree, cache, *more):
    cfg = compose_cfg("data=imagefolder", f"data.root={tree}", f"data.cache_dir={cache}", *more)
    return cfg.data


def files_of(tree, cache):
    """The loaders' files: images.scan_tree's order, bad images left out."""
    _, files, _ = images.scan_tree(tree, 1, cache)
    return files


def expected(path, resize):
    return np.asarray(crops.resized(images.load_rgb(path), resize))


def assert_store_is_the_decode(store, files, resize):
    for split in checks.SPLITS:
        images = store.images(split)
        assert len(images) == len(files[split])
        for i, path in enumerate(files[split]):
            want = expected(path, resize)
            got = images.image(i)
            assert got.dtype == np.uint8 and got.shape == want.shape, (path, got.shape, want.shape)
            assert np.array_equal(got, want), path
            assert images.size(i) == (want.shape[1], want.shape[0])


def stores(cache):
    root = cache / "tiles"
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.exists() else []


def messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.name == "resnet_sweep.data.tiles" and r.levelno >= level]


@pytest.fixture
def mixed_tree(tmp_path):
    """Uniform 40x40 RGB PNGs plus, in train: a 16-bit PNG, a grey PNG, an EXIF-rotated JPEG, an RGBA
    PNG and other sizes."""
    tree = make_tree(tmp_path / "tiles", per_class=(2, 1, 1), size=40)
    rng = np.random.default_rng(1)
    a, b = tree / "train" / "a_class", tree / "train" / "b_class"
    Image.fromarray(rng.integers(0, 65535, (44, 40), dtype=np.uint16)).save(a / "sixteen.png")
    Image.fromarray(rng.integers(0, 255, (40, 52), dtype=np.uint8), "L").save(a / "grey.png")
    Image.fromarray(rng.integers(0, 255, (48, 36, 3), dtype=np.uint8)).save(b / "tall.png")
    Image.fromarray(rng.integers(0, 255, (38, 61, 4), dtype=np.uint8), "RGBA").save(b / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(b / "rotated.jpg", exif=exif.tobytes())
    return tree


@pytest.mark.parametrize("resize", [None, 33])
def test_the_store_holds_exactly_the_loaders_decode(tmp_path, mixed_tree, resize):
    cache = tmp_path / "cache"
    files = files_of(mixed_tree, cache)
    with Image.open(mixed_tree / "train" / "a_class" / "sixteen.png") as im:
        assert im.mode.startswith("I")  # really 16-bit
    assert images.load_rgb(mixed_tree / "train" / "b_class" / "rotated.jpg").size == (40, 56)  # really rotated
    store = tiles.get(data_cfg(mixed_tree, cache), files, resize)
    assert store is not None and store.path == cache / "tiles" / store.key
    assert_store_is_the_decode(store, files, resize)
    train = store.images("train")
    assert train.uniform() is None  # mixed sizes
    assert len({train.size(i) for i in range(len(train))}) > 1
    # the size the budget is checked against, from the headers alone, is the stored size
    stored = sum(store.meta["bytes"].values())
    assert tiles._header_bytes([p for s in files for p in files[s]], resize, 2) == stored
    assert stored == sum(expected(p, resize).nbytes for s in files for p in files[s])
    # valid and test hold 40x40 images only: one array, a view of the memory map
    valid = store.images("valid").uniform()
    size = resize or 40
    assert isinstance(valid, np.memmap) and valid.shape == (len(files["valid"]), size, size, 3)


def test_uniform_images_are_one_memmap_and_crops_are_views(tmp_path, tiny_tree):
    cache = tmp_path / "cache"
    files = files_of(tiny_tree, cache)
    store = tiles.get(data_cfg(tiny_tree, cache), files, None)
    train = store.images("train")
    u = train.uniform()
    assert isinstance(u, np.memmap) and u.shape == (12, 40, 40, 3) and u.dtype == np.uint8
    assert all(np.array_equal(u[i], expected(p, None)) for i, p in enumerate(files["train"]))
    crop = train.crop(5, left=3, top=7, size=32)
    assert crop.shape == (32, 32, 3) and np.shares_memory(crop, u) and np.shares_memory(train.image(5), u)
    assert np.array_equal(crop, expected(files["train"][5], None)[7:39, 3:35])
    with pytest.raises(ValueError, match="outside image 5"):
        train.crop(5, left=9, top=0, size=32)
    again = pickle.loads(pickle.dumps(train))  # to a worker process: the map is reopened, not pickled
    assert len(pickle.dumps(train)) < 5000 and np.array_equal(again.uniform(), u)


def test_a_changed_added_or_removed_image_is_a_new_store_and_the_same_files_reuse_it(tmp_path, tiny_tree, caplog):
    cache = tmp_path / "cache"
    cfg = data_cfg(tiny_tree, cache)
    caplog.set_level(logging.INFO, logger="resnet_sweep.data.tiles")
    first = tiles.get(cfg, files_of(tiny_tree, cache), None)
    caplog.clear()
    again = tiles.get(cfg, files_of(tiny_tree, cache), None)
    assert again.key == first.key and again.meta == first.meta and not messages(caplog)  # reused, silently
    assert tiles.get(cfg, files_of(tiny_tree, cache), 48).key != first.key  # another resize

    target = tiny_tree / "train" / "a_class" / "img0.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    files = files_of(tiny_tree, cache)
    changed = tiles.get(cfg, files, None)
    assert changed.key != first.key
    assert_store_is_the_decode(changed, files, None)

    Image.new("RGB", (40, 40), (9, 9, 9)).save(tiny_tree / "valid" / "b_class" / "new.png")
    files = files_of(tiny_tree, cache)
    added = tiles.get(cfg, files, None)
    assert added.key not in (first.key, changed.key) and len(added.images("valid")) == 7
    assert_store_is_the_decode(added, files, None)

    (tiny_tree / "test" / "a_class" / "img1.png").unlink()
    files = files_of(tiny_tree, cache)
    removed = tiles.get(cfg, files, None)
    assert removed.key not in (first.key, changed.key, added.key) and len(removed.images("test")) == 5
    assert_store_is_the_decode(removed, files, None)


def test_two_concurrent_builders_build_it_once(tmp_path, tiny_tree, caplog, monkeypatch):
    cache = tmp_path / "cache"
    cfg, files = data_cfg(tiny_tree, cache), files_of(tiny_tree, cache)
    decoded = []
    plain = tile_writer.decode

    def slow(path, resize):  # long enough that both jobs are waiting on the lock or building
        decoded.append(path)
        time.sleep(0.02)
        return plain(path, resize)

    monkeypatch.setattr(tile_writer, "decode", slow)
    caplog.set_level(logging.INFO, logger="resnet_sweep.data.tiles")
    start, got = threading.Barrier(2), [None, None]

    def job(k):
        start.wait()
        got[k] = tiles.get(cfg, files, None)

    threads = [threading.Thread(target=job, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got[0] is not None and got[1] is not None and got[0].key == got[1].key
    assert len(decoded) == 24  # every image once, by one builder
    assert sum("building the tile store" in m for m in messages(caplog)) == 1
    assert stores(cache) == [got[0].key]
    assert not [p for p in (cache / "tiles").iterdir() if p.name.startswith(".")]  # no temp folder left
    assert_store_is_the_decode(got[1], files, None)


def _truncate(folder):
    os.truncate(folder / "train.u8", 1000)
    return "train.u8 is 1,000 bytes, not 57,600 (truncated)"


def _overwrite(folder):
    with open(folder / "valid.u8", "r+b") as f:
        f.seek(5000)
        f.write(b"\x7b" * 64)
    return "valid.u8 has changed bytes"


def _index(folder):
    index = np.load(folder / "test.index.npy")
    index[1, 0] += 3  # a shifted image: every pixel off by one channel
    np.save(folder / "test.index.npy", index)
    return "test.index.npy has changed bytes"


@pytest.mark.parametrize("damage", [_truncate, _overwrite, _index], ids=["truncated", "overwritten", "index"])
def test_a_damaged_store_is_one_warning_and_a_rebuild_never_read(tmp_path, tiny_tree, caplog, damage):
    cache = tmp_path / "cache"
    cfg, files = data_cfg(tiny_tree, cache), files_of(tiny_tree, cache)
    first = tiles.get(cfg, files, None)
    says = damage(first.path)
    sealed._verified.clear()  # as a new process: verified once per process, when first opened
    caplog.set_level(logging.INFO, logger="resnet_sweep.data.tiles")
    rebuilt = tiles.get(cfg, files, None)
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"tile store {first.path} is damaged" in warnings[0] and says in warnings[0], warnings[0]
    assert any("building the tile store" in m for m in messages(caplog))
    assert rebuilt.path == first.path and stores(cache) == [first.key]
    assert_store_is_the_decode(rebuilt, files, None)
    caplog.clear()
    sealed._verified.clear()
    tiles.get(cfg, files, None)  # whole again: reused, silently
    assert not messages(caplog)


def test_over_tile_store_max_gb_or_the_free_disk_is_one_line_and_none(tmp_path, tiny_tree, caplog, monkeypatch):
    cache = tmp_path / "cache"
    files = files_of(tiny_tree, cache)
    caplog.set_level(logging.INFO, logger="resnet_sweep.data.tiles")
    # 24 images of 40x40x3 = 115,200 bytes
    assert tiles.get(data_cfg(tiny_tree, cache, "data.tile_store_max_gb=0.0001"), files, None) is None
    lines = messages(caplog)
    says = "24 decoded images would take 0.1 MB, over data.tile_store_max_gb=0.0001"
    assert len(lines) == 1 and says in lines[0], lines
    assert not (cache / "tiles").exists()

    caplog.clear()
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100_000, 100_000))
    assert tiles.get(data_cfg(tiny_tree, cache), files, None) is None
    lines = messages(caplog)
    assert len(lines) == 1 and f"{cache / 'tiles'} has 0.1 MB free" in lines[0], lines
    assert stores(cache) == []
    monkeypatch.undo()
    assert tiles.get(data_cfg(tiny_tree, cache, "data.tile_store_max_gb=0.00012"), files, None) is not None


def test_tile_store_off_is_none_and_touches_nothing(tmp_path, tiny_tree, caplog):
    cache = tmp_path / "cache"
    files = files_of(tiny_tree, cache)
    caplog.set_level(logging.INFO, logger="resnet_sweep.data.tiles")
    assert tiles.get(data_cfg(tiny_tree, cache, "data.tile_store=off"), files, None) is None
    plain = OmegaConf.create({"cache_dir": str(cache), "tile_store": "off", "tile_store_max_gb": 20})
    assert tiles.get(plain, files, None) is None
    assert not (cache / "tiles").exists() and not messages(caplog)
    # data.tile_store=maybe, data.tile_store_max_gb=-1: refused before any job (test_config_schema)
