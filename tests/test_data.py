"""The data tree: one-line errors for bad trees, the embedded demo data, normalisation."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
from conftest import FAST, compose_cfg, hydra_conf, make_tree, run_app
from hydra import compose
from PIL import Image

from resnet_sweep.data import demo_data, images, loading, normalisation


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    last = err.splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


def break_missing_split(root: Path):
    shutil.rmtree(root / "valid")
    return ["missing split folder 'valid'", str(root / "valid")]


def break_one_class(root: Path):
    shutil.rmtree(root / "valid" / "b_class")
    return ["split 'valid' has 1 class folder ('a_class'); expected 2 or more", str(root)]


def break_class_names(root: Path):
    (root / "test" / "b_class").rename(root / "test" / "c_class")
    return ["class folders differ between splits: test/ has no folder 'b_class'", "test has ['a_class', 'c_class']"]


def break_empty_class(root: Path):
    for f in (root / "train" / "b_class").iterdir():
        f.unlink()
    return [f"{root / 'train' / 'b_class'} has no images"]


def break_small_image(root: Path):
    small = root / "valid" / "a_class" / "img1.png"
    Image.new("RGB", (20, 30)).save(small)
    return [str(small), "is 20x30, smaller than the 32x32 crop; set backbone.crop_size<=20 or backbone.resize=32"]


@pytest.mark.parametrize(
    "breaker", [break_missing_split, break_one_class, break_class_names, break_empty_class, break_small_image]
)
def test_bad_tree_gives_a_one_line_error_naming_the_path(tmp_path, breaker):
    root = make_tree(tmp_path / "tiles")
    fragments = breaker(root)
    proc = run_app(tmp_path, *FAST, "data=imagefolder", f"data.root={root}", check=False)
    assert_one_line_error(proc, *fragments)


def test_hidden_files_are_ignored(tmp_path):
    root = make_tree(tmp_path / "tiles")
    (root / "train" / "a_class" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "train" / "a_class" / "._img0.png").write_bytes(b"\0\1junk")
    classes, files, skipped = images.scan_tree(root, 32)
    assert not skipped
    assert classes == ["a_class", "b_class"]
    assert len(files["train"]) == 12


def demo_cfg(tmp_path, **over):
    with hydra_conf():
        cfg = compose(
            "train",
            overrides=[f"data.cache_dir={tmp_path}", "data.tiles_per_slide=2"]
            + [f"data.{k}={v}" for k, v in over.items()],
        )
    return cfg.data


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_data_is_deterministic_two_classes_and_grouped_by_slide(tmp_path):
    root = demo_data.ensure(demo_cfg(tmp_path / "a"))
    again = demo_data.ensure(demo_cfg(tmp_path / "b"))
    other_seed = demo_data.ensure(demo_cfg(tmp_path / "c", seed=1))
    assert tree_digest(root) == tree_digest(again)
    assert tree_digest(root) != tree_digest(other_seed)

    classes, files, _ = images.scan_tree(root, 224)
    assert classes == ["differentiating", "poorly_differentiated"]
    assert [len(files[s]) for s in ("train", "valid", "test")] == [32, 8, 8]  # 2 tiles per slide
    with Image.open(files["train"][0]) as im:
        assert im.size == (250, 250) and im.mode == "RGB"
    slides = {s: {re.match(r"slide(\w+)_tile", p.name)[1] for p in files[s]} for s in files}
    assert not slides["train"] & slides["valid"] and not slides["train"] & slides["test"]
    assert not slides["valid"] & slides["test"]


def test_default_demo_size_is_about_160_40_40(tmp_path):
    cfg = compose_cfg()
    per_split = [n * 2 * cfg.data.tiles_per_slide for n in cfg.data.slides_per_class]
    assert per_split == [160, 40, 40]


def test_dataset_normalisation_is_computed_on_train_and_cached(tmp_path, tiny_tree):
    with hydra_conf():
        cfg = compose(
            "train",
            overrides=[
                *FAST,
                "data=imagefolder",
                f"data.root={tiny_tree}",
                "data.normalize=dataset",
                f"data.cache_dir={tmp_path / 'c'}",
            ],
        )
    splits = loading.load_splits(cfg.data, cfg.trainer, crop_size=32)
    # reddish class: channel 0 in 120..240, others 0..120 and vice versa: mean of R and B ~ 0.47
    assert splits.mean[0] == pytest.approx(splits.mean[2], abs=0.05)
    assert splits.mean[1] < splits.mean[0]
    assert list((tmp_path / "c" / "stats").glob("*.json"))
    x, _ = next(iter(splits.valid))
    assert abs(float(x.mean())) < 0.5


def test_stats_is_the_mean_and_std_of_every_training_pixel_as_dataset_normalisation_uses(tmp_path, capsys):
    import numpy as np

    from resnet_sweep.tools import cli

    root = make_tree(tmp_path / "tiles")
    (root / "train" / ".trash").mkdir()  # not a class folder: training ignores it, so must stats
    Image.new("RGB", (40, 40), "white").save(root / "train" / ".trash" / "old.png")
    pixels = np.concatenate(
        [
            np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
            for p in sorted((root / "train").glob("*_class/*.png"))
        ]
    )
    assert cli.main(["stats", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"12 images under {root / 'train'}"
    assert out[1] == "mean: [" + ", ".join(f"{v:.4f}" for v in pixels.mean(0)) + "]"
    assert out[2] == "std:  [" + ", ".join(f"{v:.4f}" for v in pixels.std(0)) + "]"

    _, files, _ = images.scan_tree(root, 32)
    mean, std = normalisation.dataset_stats(files["train"], tmp_path / "c")  # what data.normalize=dataset uses
    assert mean == pytest.approx(pixels.mean(0), abs=1e-6) and std == pytest.approx(pixels.std(0), abs=1e-6)
    streamed = normalisation.channel_stats(iter(files["train"]))  # any iterable: one image at a time
    assert streamed == (mean, std)


def add_bad_and_convertible_images(root: Path) -> tuple[list[Path], list[Path]]:
    """One file of each bad kind and of each convertible kind, in train/a_class."""
    import io

    import numpy as np

    folder = root / "train" / "a_class"
    good_png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(good_png, "PNG")
    bad = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "truncated.png": good_png.getvalue()[: len(good_png.getvalue()) // 2],
        "empty.jpg": b"",
        "notes.txt": b"not an image at all\n",
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    rgb = np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((np.random.default_rng(2).integers(0, 65535, (40, 48))).astype(np.uint16)).save(
        folder / "sixteen.png"
    )
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._grey.png").write_bytes(b"\0\5\26\7")
    convertible = ["grey.png", "palette.png", "rgba.png", "sixteen.png", "cmyk.jpg", "rotated.jpg"]
    return [folder / n for n in bad], [folder / n for n in convertible]


def test_bad_images_are_named_all_at_once_on_one_line_grouped_by_reason(tmp_path):
    root = make_tree(tmp_path / "tiles")
    bad, _ = add_bad_and_convertible_images(root)
    proc = run_app(tmp_path, *FAST, "data=imagefolder", f"data.root={root}", check=False)
    last = assert_one_line_error(
        proc,
        f"data.root={root}: 4 bad images: 3 files cannot be read as images (train/a_class/corrupt.png (",
        "): fix or remove them; 1 file is empty (zero bytes: train/a_class/empty.jpg): remove it; "
        "or set data.on_bad_image=skip to leave them all out",
    )
    for path in bad:
        assert path.relative_to(root).as_posix() in last
    assert sum(str(root) in line for line in proc.stderr.splitlines()) == 1  # not one line per file
    assert ".DS_Store" not in proc.stderr and "._grey" not in proc.stderr


def test_images_smaller_than_the_crop_are_one_line_with_count_examples_and_both_fixes(tmp_path):
    root = make_tree(tmp_path / "tiles")  # 24 tiles of 40x40
    cache = tmp_path / "cache"
    fast = [a for a in FAST if not a.startswith("backbone.crop_size=")]
    proc = run_app(
        tmp_path,
        *fast,
        "backbone.crop_size=64",
        "data=imagefolder",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        check=False,
    )
    last = assert_one_line_error(
        proc,
        f"data.root={root}: 24 images are smaller than the 64x64 crop (e.g. train/a_class/img0.png 40x40, "
        "train/a_class/img1.png 40x40, train/a_class/img2.png 40x40, ...); set backbone.crop_size<=40 or "
        "backbone.resize=64, or set data.on_bad_image=skip (all 24 listed in ",
    )
    assert sum(str(root) in line for line in proc.stderr.splitlines()) == 1  # not 24 more
    listed = Path(re.search(r"all 24 listed in (\S+)\)$", last)[1])
    assert sorted(line.split("\t")[0] for line in listed.read_text().splitlines()) == sorted(
        str(p) for p in root.rglob("*.png")
    )
    # either fix the line gives works
    cfg = compose_cfg(*fast, "data=imagefolder", f"data.root={root}", f"data.cache_dir={cache}")
    resized = loading.load_splits(cfg.data, cfg.trainer, crop_size=64, resize=64)
    assert next(iter(resized.valid))[0].shape[-2:] == (64, 64)
    assert not loading.load_splits(cfg.data, cfg.trainer, crop_size=40).skipped


def test_skip_leaves_bad_images_out_counts_them_and_convertible_kinds_train(tmp_path):
    from conftest import mlflow_runs

    root = make_tree(tmp_path / "tiles")
    bad, convertible = add_bad_and_convertible_images(root)
    run_app(tmp_path, *FAST, "data=imagefolder", f"data.root={root}", "data.on_bad_image=skip")
    run = mlflow_runs(tmp_path).all[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/skipped_images"] == 4
    classes, files, skipped = images.scan_tree(root, 32, tmp_path / "c", "skip")
    assert sorted(p for p, _ in skipped) == sorted(str(p) for p in bad)
    assert set(convertible) <= set(files["train"])
    for path in convertible:
        image = images.load_rgb(path)
        assert image.mode == "RGB"
    assert images.load_rgb(convertible[-1]).size == (40, 48)  # EXIF orientation applied (was 48x40)
    import numpy as np

    sixteen = np.asarray(images.load_rgb(convertible[3]))
    assert 100 < sixteen.mean() < 155  # scaled from 16 bits, not clipped to white


def test_image_checks_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tiles")
    files = sorted((root / "train").rglob("*.png"))
    assert images.check_images(files, 32, tmp_path / "c") == []
    calls = []
    monkeypatch.setattr(images, "check_image", lambda p, c: calls.append(p))
    assert images.check_images(files, 32, tmp_path / "c") == []
    assert calls == []  # all cached
    files[0].write_bytes(b"")
    monkeypatch.undo()
    assert images.check_images(files, 32, tmp_path / "c") == [(str(files[0]), "zero-byte file")]
