"""Batches from the decoded tile store (issue 14): the same pixels, crops, order and losses as the PIL
path, augmentation included; the feature bank extracts the same features from it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import FAST, REPO, compose_cfg, make_tree
from PIL import Image

from resnet_sweep.config import checks
from resnet_sweep.core import draws
from resnet_sweep.data import batches, crops, loading
from resnet_sweep.data.images import load_rgb
from resnet_sweep.training import engine, features, models


def config(tree, *more):
    return compose_cfg(*FAST, "data=imagefolder", f"data.root={tree}", *more)


def build(cfg, **kw):
    return loading.load_splits(
        cfg.data,
        cfg.trainer,
        crop_size=int(cfg.backbone.crop_size),
        seed=int(cfg.seed),
        resize=cfg.backbone.get("resize"),
        crop_seed=int(cfg.trainer.crop_seed),
        **kw,
    )


def epochs_of(loader, epochs=(0, 1, 2)):
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b)
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
            assert torch.equal(ya, yb)
            assert torch.equal(xa, xb)  # the same pixels, normalised operation for operation


@pytest.mark.parametrize("more", [[], ["data.augment=[hflip,vflip,rot90]"], ["backbone.resize=48"]])
def test_store_batches_equal_the_pil_batches_crop_for_crop(tmp_path, more):
    tree = make_tree(tmp_path / "tiles", per_class=(5, 2, 2), size=44)
    cfg = config(tree, "backbone.crop_size=32", *more)
    store, pil = (
        build(cfg),
        build(
            cfg,
        ),
    )
    assert isinstance(store.train.loader(), batches.StoreLoader)
    for split in checks.SPLITS:
        pil_loader = getattr(pil, split).pil
        assert_same_batches(epochs_of(getattr(store, split)), epochs_of(pil_loader))


def test_store_crops_are_the_pil_crops_bit_for_bit(tmp_path):
    tree = make_tree(tmp_path / "tiles", per_class=(4, 1, 1), size=40)
    cfg = config(tree, "backbone.crop_size=24")
    splits = build(cfg)
    images = splits.store.images("train")
    for i, (path, _) in enumerate(splits.train.dataset.samples):
        pil = load_rgb(path)
        for view in range(3):
            top, left = crops.crop_offset(pil.size, 24, 0, i, view)
            expected = np.asarray(pil.crop((left, top, left + 24, top + 24)))
            assert np.array_equal(images.crop(i, left, top, 24), expected)


def test_mixed_sizes_go_through_the_store_too(tmp_path):
    tree = make_tree(tmp_path / "tiles", per_class=(4, 2, 2), size=40)
    Image.fromarray(np.full((56, 48, 3), 90, np.uint8)).save(tree / "train" / "a_class" / "wide.png")
    Image.fromarray(np.full((36, 70, 3), 200, np.uint8)).save(tree / "valid" / "b_class" / "tall.png")
    cfg = config(tree, "backbone.crop_size=32", "data.augment=[rot90]")
    store, pil = build(cfg), build(cfg)
    assert store.store.images("train").uniform() is None
    for split in checks.SPLITS:
        assert_same_batches(epochs_of(getattr(store, split)), epochs_of(getattr(pil, split).pil))


def test_a_device_resident_split_gives_the_same_batches(tmp_path):
    tree = make_tree(tmp_path / "tiles", per_class=(5, 2, 2), size=40)
    cfg = config(tree, "backbone.crop_size=32", "data.augment=[hflip,vflip,rot90]", "data.tile_store_device=on")
    resident, host = build(cfg), build(config(tree, "backbone.crop_size=32", "data.augment=[hflip,vflip,rot90]"))
    assert resident.train.loader().on_device is not None and host.train.loader().on_device is None
    for split in checks.SPLITS:
        assert_same_batches(epochs_of(getattr(resident, split)), epochs_of(getattr(host, split)))


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 3, 2**63 - 1])
def test_crops_drawn_for_a_whole_epoch_at_once_equal_the_per_image_draws(seed):
    """The store's loaders draw an epoch's crops and flips in one vectorised pass (crops.train_windows);
    every image gets what crop_offset / augment_ops (one numpy generator per image) give it."""
    rng = np.random.default_rng(5)
    n, crop = 2000, 224
    indices = np.concatenate([np.arange(100), rng.integers(100, 2**32, n - 100)])
    views = rng.integers(0, 100, n)
    sizes = np.stack([rng.integers(crop, crop + 300, n), rng.integers(crop, crop + 300, n)], axis=1)
    sizes[:30] = crop  # no room to move: nothing drawn
    sizes[30:60, 1] = crop  # rows fixed, columns drawn
    for augment in [(), ("hflip", "vflip", "rot90"), ("rot90",)]:
        got = crops.train_windows(sizes, crop, seed, indices, views, augment)
        want = [
            (
                *crops.crop_offset(tuple(sizes[k]), crop, seed, indices[k], views[k]),
                crops.augment_ops(augment, seed, indices[k], views[k]),
            )
            for k in range(n)
        ]
        assert got == want
    # bounds near 2**32 make numpy's bounded draw reject some outputs and draw again: equal there too
    keys = np.stack([np.full(n, seed), indices, views], axis=1)
    bounds = rng.integers(2**31, 2**32 - 1, (n, 2))
    got = draws.integers(keys, bounds)
    for k in range(n):
        g = np.random.default_rng([int(seed), int(indices[k]), int(views[k])])
        assert got[k].tolist() == [g.integers(int(b)) for b in bounds[k]]


def test_augmentation_draws_flips_and_turns_per_image_and_view():
    crop = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    assert np.array_equal(crops.apply_augment(crop, (True, False, 0)), crop[:, ::-1])
    assert np.array_equal(crops.apply_augment(crop, (False, True, 0)), crop[::-1])
    assert np.array_equal(crops.apply_augment(crop, (False, False, 1)), np.rot90(crop))
    both = crops.apply_augment(crop, (True, True, 3))
    assert np.array_equal(both, np.rot90(crop[::-1, ::-1], 3))
    assert torch.equal(
        crops.apply_augment_tensor(torch.from_numpy(crop), (True, True, 3)), torch.from_numpy(both.copy())
    )
    assert crops.augment_ops((), 0, 1, 2) == ()
    drawn = {crops.augment_ops(("hflip", "vflip", "rot90"), 0, i, v) for i in range(20) for v in range(4)}
    assert len(drawn) > 8 and {d[2] for d in drawn} == {0, 1, 2, 3}  # varied, every turn drawn
    assert all(d[0] is False and d[2] == 0 for d in (crops.augment_ops(("vflip",), 0, i, 0) for i in range(20)))
    assert crops.augment_ops(("hflip",), 3, 5, 1) == crops.augment_ops(("hflip",), 3, 5, 1)  # a pure function


def test_fine_tuning_logs_the_same_losses_with_the_store_on_and_off(tmp_path):
    tree = make_tree(tmp_path / "tiles", per_class=(6, 3, 3), size=40)

    def losses(*more):
        cfg = config(
            tree,
            "backbone.crop_size=32",
            "backbone.freeze=none",
            "trainer.max_epochs=2",
            "trainer.precision=32",
            "optimizer.lr=1e-2",
            *more,
        )
        torch.manual_seed(0)
        built = models.build_classifier(cfg.backbone, cfg.head, seed=0)
        splits = build(cfg)
        history = engine.fit(
            built.model,
            splits,
            cfg.optimizer,
            cfg.trainer,
            lambda *a: None,
            cfg.objective,
            state_fn=lambda: {},
            device=torch.device("cpu"),
        )
        return splits, [[m[k] for k in ("train/loss", "valid/loss", "valid/acc")] for m in history.epochs]

    store_splits, with_store = losses()
    pil_splits, without = losses("data.tile_store=off")
    assert isinstance(store_splits.train.loader(), batches.StoreLoader)
    assert pil_splits.train.loader() is pil_splits.train.pil
    np.testing.assert_allclose(with_store, without, rtol=1e-6, atol=1e-7)


def test_the_bank_extracted_from_the_store_equals_the_decoded_one(tmp_path):
    tree = make_tree(tmp_path / "tiles", per_class=(4, 2, 2), size=40)
    arrays = []
    for more in ([], ["data.tile_store=off"]):
        cfg = config(
            tree,
            "backbone.crop_size=32",
            "trainer.precision=32",
            "trainer.bank_views=2",
            f"data.cache_dir={tmp_path / ('c' + str(len(arrays)))}",
            *more,
        )
        built = models.build_classifier(cfg.backbone, cfg.head, seed=0)
        bank = features.get(cfg, built, build(cfg), torch.device("cpu"))
        arrays.append({s: np.asarray(bank.array(s), dtype=np.float32) for s in checks.SPLITS})
    assert (tmp_path / "c0" / "tiles").is_dir() and not (tmp_path / "c1" / "tiles").exists()
    for split in checks.SPLITS:
        np.testing.assert_allclose(arrays[0][split], arrays[1][split], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("batch", [5, 64])
def test_the_bank_cut_from_whole_images_on_the_device_equals_the_per_crop_path(tmp_path, batch):
    """The GPU's extraction path (whole images sent, crops cut and flipped there), run on the CPU:
    the same features as cropping image by image, also when a batch splits an image's views."""
    tree = make_tree(tmp_path / "tiles", per_class=(4, 2, 2), size=40)
    cfg = config(tree, "backbone.crop_size=32", "trainer.precision=32", "data.augment=[hflip,vflip,rot90]")
    splits = build(cfg)
    backbone = models.build_classifier(cfg.backbone, cfg.head, seed=0).model.backbone
    files, labels = features.samples_of(splits)
    out = {}
    for device_crops in (False, True):
        out[device_crops] = tmp_path / str(device_crops)
        out[device_crops].mkdir()
        stats = features.extract(
            backbone,
            files,
            labels,
            32,
            splits.mean,
            splits.std,
            3,
            splits.crop_seed,
            torch.device("cpu"),
            out[device_crops],
            batch_size=batch,
            store=splits.store.get(),
            augment=splits.augment,
            device_crops=device_crops,
        )
        assert stats["crops"] == 3 * 8 + 4 + 4
    for split in checks.SPLITS:
        np.testing.assert_allclose(
            np.load(out[True] / f"{split}.npy"), np.load(out[False] / f"{split}.npy"), rtol=1e-6, atol=1e-6
        )


def test_augmentation_reaches_the_bank_views_and_its_key(tmp_path):
    tree = make_tree(tmp_path / "tiles", per_class=(4, 2, 2), size=40)
    keys, trains = [], []
    for more in ([], ["data.augment=[hflip,vflip,rot90]"]):
        cfg = config(tree, "backbone.crop_size=32", "trainer.precision=32", "trainer.bank_views=3", *more)
        built = models.build_classifier(cfg.backbone, cfg.head, seed=0)
        splits = build(cfg)
        bank = features.get(cfg, built, splits, torch.device("cpu"))
        keys.append(bank.key)
        trains.append(np.asarray(bank.array("train"), dtype=np.float32))
        if more:  # the bank's view v of image i is the training loop's crop at epoch v + 1
            splits.train.set_epoch(2)
            crop, _ = splits.train.dataset[3]
            with torch.inference_mode():
                direct = built.model.backbone.eval()(crop.unsqueeze(0)).float()[0].numpy()
            banked = torch.from_numpy(trains[-1][1, 3])
            assert torch.nn.functional.cosine_similarity(banked, torch.from_numpy(direct), dim=0) > 0.999
    assert keys[0] != keys[1] and not np.allclose(trains[0], trains[1])


def test_over_the_size_limit_the_loaders_fall_back_to_pil_in_one_line(tmp_path, caplog):
    tree = make_tree(tmp_path / "tiles", per_class=(3, 1, 1), size=40)
    cfg = config(tree, "data.tile_store_max_gb=0.00001")
    splits = build(cfg)
    with caplog.at_level(logging.INFO):
        assert splits.train.loader() is splits.train.pil
    assert sum("tile_store_max_gb" in r.getMessage() for r in caplog.records) == 1


def test_a_bad_augment_is_one_line():
    from resnet_sweep.core.errors import UserError

    with pytest.raises(UserError, match=r"data.augment=\['flip'\]: unknown flip; choose from hflip, vflip, rot90"):
        checks.check_augment(["flip"])


@pytest.mark.e2e
def test_the_cuda_check_and_the_data_path_bench_run_on_the_cpu(tmp_path):
    """benchmarks/cuda_check.py is what a GPU session runs: its tiny mode must work here first."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cuda_check.py"), "--cpu", "--smoke"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "RESNET_SWEEP_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in (
        "1. pipeline only",
        "2. fine-tuning resnet18",
        "3. feature bank extraction from the store",
        "0. data path: fine-tuning",
        "CUDA CHECK OK",
    ):
        assert line in proc.stdout, proc.stdout
