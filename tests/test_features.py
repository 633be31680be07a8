"""The frozen-backbone feature bank."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import FAST, REPO, TRAIN_PY, client_for, fresh_store, hydra_conf, make_tree, mlflow_runs, run_app
from hydra import compose
from PIL import Image

from resnet_sweep.config import checks
from resnet_sweep.data import crops, images, loading
from resnet_sweep.training import features, models


def cfg_for(tree, cache, *more):
    with hydra_conf():
        return compose(
            "train",
            overrides=[
                *FAST,
                "data=imagefolder",
                f"data.root={tree}",
                f"data.cache_dir={cache}",
                "trainer.bank_views=3",
                *more,
            ],
        )


def build_bank(cfg):
    splits = loading.load_splits(cfg.data, cfg.trainer, crop_size=int(cfg.backbone.crop_size))
    built = models.build_classifier(cfg.backbone, cfg.head, seed=int(cfg.seed))
    return features.get(cfg, built, splits, torch.device("cpu")), built, splits


def test_bank_features_equal_a_direct_backbone_forward_on_the_same_crop(tmp_path, tiny_tree):
    cfg = cfg_for(tiny_tree, tmp_path / "cache")
    bank, built, splits = build_bank(cfg)
    backbone = built.model.backbone.eval()
    # the crop the naive loop trains on at epoch e (view e - 1), straight from its DataLoader's dataset
    for epoch in (1, 2, 3):
        splits.train.set_epoch(epoch)
        crop, _ = splits.train.dataset[4]
        with torch.inference_mode():
            direct = backbone(crop.unsqueeze(0)).float()[0]
        banked = torch.from_numpy(np.asarray(bank.array("train")[epoch - 1, 4], dtype=np.float32))
        cosine = torch.nn.functional.cosine_similarity(direct, banked, dim=0).item()
        assert cosine > 0.999, (epoch, cosine)
        assert torch.allclose(direct, banked, rtol=0.05, atol=0.05 * direct.abs().max().item())
    # the three views are three different crops
    views = torch.from_numpy(np.asarray(bank.array("train")[:, 4], dtype=np.float32))
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[1], views[2])
    # valid/test: the centre crop
    valid_files = [p for p, _ in splits.valid.dataset.samples]
    centre = crops.eval_transform(splits.crop_size, splits.mean, splits.std, splits.resize)(
        images.load_rgb(valid_files[0])
    ).unsqueeze(0)
    with torch.inference_mode():
        direct = backbone(centre).float()[0]
    banked = torch.from_numpy(np.asarray(bank.array("valid")[0], dtype=np.float32))
    assert torch.nn.functional.cosine_similarity(direct, banked, dim=0).item() > 0.999
    assert bank.meta["crops"] == 3 * 12 + 6 + 6


def test_the_bank_does_not_depend_on_how_crops_are_batched(tmp_path, tiny_tree):
    """Batches of 5 split an image's 3 views across batches; the stored features are the same."""
    cfg = cfg_for(tiny_tree, tmp_path / "cache")
    bank, built, splits = build_bank(cfg)
    files, labels = features.samples_of(splits)
    out = tmp_path / "batches-of-5"
    out.mkdir()
    stats = features.extract(
        built.model.backbone,
        files,
        labels,
        splits.crop_size,
        splits.mean,
        splits.std,
        3,
        splits.crop_seed,
        torch.device("cpu"),
        out,
        batch_size=5,
    )
    assert stats["crops"] == bank.meta["crops"] == 3 * 12 + 6 + 6
    for split in checks.SPLITS:
        small = torch.from_numpy(np.load(out / f"{split}.npy").astype(np.float32)).flatten(0, -2)
        whole = torch.from_numpy(np.asarray(bank.array(split), dtype=np.float32)).flatten(0, -2)
        assert small.shape == whole.shape
        assert torch.nn.functional.cosine_similarity(small, whole, dim=1).min().item() > 0.999, split
        assert np.array_equal(np.load(out / f"{split}_labels.npy"), bank.labels(split).numpy())


def test_a_changed_image_invalidates_the_key_and_the_same_data_reuses_it(tmp_path, tiny_tree):
    cfg = cfg_for(tiny_tree, tmp_path / "cache")
    first, _, _ = build_bank(cfg)
    again, _, _ = build_bank(cfg)
    assert again.key == first.key and again.meta["seconds"] == first.meta["seconds"]  # reused, not rebuilt
    target = tiny_tree / "train" / "a_class" / "img0.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    changed, _, _ = build_bank(cfg)
    assert changed.key != first.key
    more_views, _, _ = build_bank(cfg_for(tiny_tree, tmp_path / "cache", "trainer.bank_views=4"))
    assert more_views.key not in (first.key, changed.key)


@pytest.mark.e2e
def test_two_concurrent_jobs_build_one_bank(tmp_path, tiny_tree):
    cache = tmp_path / "cache"
    args = [*FAST, "data=imagefolder", f"data.root={tiny_tree}", f"data.cache_dir={cache}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i in range(2):  # each job's own store (tracking.uri below)
        fresh_store(tmp_path, f"m{i}.db")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(TRAIN_PY),
                *args,
                f"tracking.uri=sqlite:///{tmp_path}/m{i}.db",
                f"hydra.run.dir={tmp_path}/out{i}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    banks = [d for d in (cache / "features").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(banks) == 1
    assert sum("building the feature bank" in out for out in outputs) == 1


def test_full_finetune_never_uses_the_bank(tmp_path, tiny_tree):
    run_app(
        tmp_path,
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "backbone.freeze=none",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    run = mlflow_runs(tmp_path).all[0]
    assert "feature_bank" not in run.data.tags
    assert not (tmp_path / "cache" / "features").exists()


def test_a_banked_run_logs_the_same_metrics_and_a_loadable_full_model(tmp_path, tiny_tree):
    """... and with bank_views >= max_epochs it trains on the naive loop's crops in its order: same curves."""
    import mlflow

    for more in ([], ["trainer.feature_bank=off"]):
        run_app(
            tmp_path,
            *FAST,
            "data=imagefolder",
            f"data.root={tiny_tree}",
            "trainer.max_epochs=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            *more,
        )
    runs = mlflow_runs(tmp_path).all
    banked = next(r for r in runs if "feature_bank" in r.data.tags)
    naive = next(r for r in runs if "feature_bank" not in r.data.tags)
    assert set(banked.data.metrics) == set(naive.data.metrics)
    client = client_for(tmp_path)
    assert [m.step for m in client.get_metric_history(banked.info.run_id, "valid/loss")] == [0, 1, 2]
    for name in ("train/loss", "valid/loss"):  # fp16 storage of the features: close, not bit-equal
        b = [m.value for m in client.get_metric_history(banked.info.run_id, name)]
        n = [m.value for m in client.get_metric_history(naive.info.run_id, name)]
        assert np.allclose(b, n, rtol=0.02, atol=0.01), (name, b, n)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = mlflow.search_logged_models(
        experiment_ids=[banked.info.experiment_id],
        filter_string=f"source_run_id = '{banked.info.run_id}'",
        output_format="list",
    )
    model = mlflow.pytorch.load_model(logged[0].model_uri)
    assert sum(p.numel() for p in model.parameters()) > 11_000_000  # backbone + head, not the head alone
    probs = model(torch.zeros(2, 3, 32, 32))
    assert probs.shape == (2,) and torch.all((probs >= 0) & (probs <= 1))


def test_bank_is_fp16_and_falls_back_to_fp32_when_features_overflow_it(tmp_path, tiny_tree):
    small, _, _ = build_bank(cfg_for(tiny_tree, tmp_path / "cache"))
    assert small.array("train").dtype == np.float16 and small.meta["dtype"] == "float16"
    # a randomly initialised ResNet101 (BatchNorm at identity) on 224 crops gives features beyond 65504
    big = make_tree(tmp_path / "big", per_class=(2, 1, 1), size=224)
    deep, _, _ = build_bank(
        cfg_for(
            big,
            tmp_path / "cache",
            "backbone=resnet101",
            "backbone.weights=none",
            "backbone.crop_size=224",
            "trainer.bank_views=1",
        )
    )
    assert deep.meta["max_abs"] > 65504 and deep.meta["dtype"] == "float32"
    assert np.isfinite(np.asarray(deep.array("train"))).all()


def bank_folder(cache):
    banks = [d for d in (cache / "features").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(banks) == 1, banks
    return banks[0]


def metrics_on_test_split(cwd):
    runs = sorted(mlflow_runs(cwd).all, key=lambda r: r.info.start_time)
    assert all(r.info.status == "FINISHED" for r in runs)
    return [{k: v for k, v in r.data.metrics.items() if k.startswith("test/")} for r in runs]


def damage_lines(proc):
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "is damaged" in line]


def again_args(tmp_path, tree) -> list[str]:
    """A banked job that runs again when repeated (not skipped as finished)."""
    return [
        *FAST,
        "data=imagefolder",
        f"data.root={tree}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.resume=false",
    ]


def test_a_bank_changed_in_place_is_reported_in_one_line_and_rebuilt_not_read(tmp_path, tiny_tree):
    """Same size, other bytes (the issue: test acc 0.70 instead of 0.925, FINISHED): the next job
    says so in one warning line, rebuilds the bank and gets the undamaged bank's test metrics."""
    args = again_args(tmp_path, tiny_tree)
    run_app(tmp_path, *args)
    target = bank_folder(tmp_path / "cache") / "test.npy"
    original, size = target.read_bytes(), target.stat().st_size
    with open(target, "r+b") as f:  # fp16 0x7b7b = 61280: features no backbone gave
        f.seek(size // 2)
        f.write(b"\x7b" * 512)
    assert target.stat().st_size == size
    proc = run_app(tmp_path, *args)
    lines = damage_lines(proc)
    assert len(lines) == 1 and "WARNING" in lines[0], proc.stdout + proc.stderr
    assert str(target.parent) in lines[0] and "test.npy has changed bytes" in lines[0], lines[0]
    assert proc.stdout.count("building the feature bank") == 1
    assert target.read_bytes() == original  # rebuilt, the same features
    first, second = metrics_on_test_split(tmp_path)
    assert first and second == first


def test_a_truncated_bank_is_rebuilt_and_the_jobs_after_it_work(tmp_path, tiny_tree):
    """Truncated (an interrupted copy, a full disk): not 'mmap length is greater than file size' in
    every later job until the cache folder is deleted by hand, but one warning and one rebuild."""
    args = again_args(tmp_path, tiny_tree)
    run_app(tmp_path, *args)
    target = bank_folder(tmp_path / "cache") / "train.npy"
    size = target.stat().st_size
    os.truncate(target, size // 2)
    proc = run_app(tmp_path, *args)
    lines = damage_lines(proc)
    assert len(lines) == 1 and "WARNING" in lines[0], proc.stdout + proc.stderr
    assert f"train.npy is {size // 2:,} bytes, not {size:,} (truncated)" in lines[0], lines[0]
    assert target.stat().st_size == size
    after = run_app(tmp_path, *args)  # the bank is whole again: used as is
    assert not damage_lines(after) and "building the feature bank" not in after.stdout + after.stderr
    first, rebuilt, later = metrics_on_test_split(tmp_path)
    assert first and rebuilt == first and later == first


def _stray(folder):
    (folder / "train.f32.npy").write_bytes(b"left over")


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda folder: os.truncate(folder / "valid.npy", 100), "valid.npy is 100 bytes, not "),
        (lambda folder: (folder / "test_labels.npy").unlink(), "test_labels.npy is missing"),
        (_stray, "train.f32.npy is not part of it"),
        (lambda folder: (folder / "meta.json").write_text('{"key": "x", "vie'), "meta.json is unreadable"),
        (lambda folder: (folder / "meta.json").unlink(), "meta.json is missing"),
        (
            lambda folder: (folder / "meta.json").write_text(
                (folder / "meta.json").read_text().replace('"views": 3', '"views": 2')
            ),
            "meta.json does not match its checksum",
        ),
    ],
    ids=["truncated", "missing", "extra", "meta-unreadable", "meta-missing", "meta-changed"],
)
def test_any_damage_to_a_bank_is_one_warning_and_a_rebuild(tmp_path, tiny_tree, caplog, damage, says):
    cfg = cfg_for(tiny_tree, tmp_path / "cache")
    first, _, _ = build_bank(cfg)
    before = {s: (np.array(first.array(s)), first.labels(s).numpy()) for s in checks.SPLITS}
    damage(first.path)
    caplog.set_level(logging.INFO, logger="resnet_sweep.training.features")
    rebuilt, _, _ = build_bank(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(first.path) in warnings[0] and says in warnings[0], warnings[0]
    assert "building the feature bank" in caplog.text
    assert rebuilt.path == first.path and rebuilt.views == 3
    for s in checks.SPLITS:
        assert np.array_equal(np.asarray(rebuilt.array(s)), before[s][0]), s
        assert np.array_equal(rebuilt.labels(s).numpy(), before[s][1]), s
    caplog.clear()
    again, _, _ = build_bank(cfg)  # whole again: reused, silently
    assert not caplog.records or all(r.levelno < logging.WARNING for r in caplog.records)
    assert "building" not in caplog.text and again.meta["seconds"] == rebuilt.meta["seconds"]


FAULTS = """
import resource, sys, torch
from resnet_sweep.training.hardware import keep_freed_memory
applied = keep_freed_memory()
x = torch.empty(100 << 20, dtype=torch.uint8); x.fill_(1); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # an activation-sized tensor allocated, written and freed, as a forward does
    x = torch.empty(100 << 20, dtype=torch.uint8); x.fill_(1); del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_jobs_reuse_freed_memory_instead_of_page_faulting_it_again(tmp_path):
    """hardware.keep_freed_memory (called by every job): 100 MB tensors allocated 10 times page-fault
    about once, not 10 times; RESNET_SWEEP_MALLOC=default keeps glibc's behaviour."""

    def faults(env):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0] == "True", int(out[1])

    applied, kept = faults({})
    opted_out, default = faults({"RESNET_SWEEP_MALLOC": "default"})
    assert applied and not opted_out
    # glibc's default: fresh pages for every allocation (25,600 faults each with 4 KiB pages)
    assert kept * 4 < default, (kept, default)
