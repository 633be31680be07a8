"""`resnet-sweep predict` with nothing to predict, or a write that fails: a one-line error naming the
folder or --out, a non-zero exit, and the user's earlier predictions CSV as it was."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, make_tree, run_app
from PIL import Image

from resnet_sweep.tools import cli

OLD = "path,probability,label\n/earlier/run.png,0.250000,a_class\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A folder with mlflow.db holding one finished run, trained with backbone.resize=32 on 40x40 tiles."""
    cwd = tmp_path_factory.mktemp("store")
    tiles = make_tree(cwd / "tiles", per_class=(4, 2, 2))
    run_app(cwd, *FAST, "backbone.resize=32", "data=imagefolder", f"data.root={tiles}")
    return cwd


@pytest.fixture
def earlier(tmp_path) -> Path:
    out = tmp_path / "predictions.csv"
    out.write_text(OLD)
    return out


def predict_cli(cwd: Path, *args: str):
    """`python -m resnet_sweep.tools.cli predict ARGS` as a user runs it (the exit code is what is checked)."""
    return subprocess.run(
        [sys.executable, "-m", "resnet_sweep.tools.cli", "predict", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def predict_main(store: Path, capsys, *args: str):
    """The same command in-process (faster; lets a test break the disk)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    try:
        rc = cli.main(["predict", *args, "--best", "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"])
    finally:
        mlflow.set_tracking_uri(previous)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.e2e
def test_an_empty_folder_is_a_one_line_error_and_the_earlier_csv_is_kept(store, tmp_path, earlier):
    empty = tmp_path / "new"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are not images
    proc = predict_cli(store, str(empty), "--best", "--out", str(earlier))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"resnet-sweep predict: {empty}: no images in this folder (hidden files are ignored); give the folder "
        f"holding the images to predict; {earlier} was not written"
    ]
    assert earlier.read_text() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "predictions.csv"]


def test_a_folder_of_unreadable_files_is_an_error_not_an_empty_csv(store, tmp_path, earlier, capsys):
    images = tmp_path / "new"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image\n")
    rc, out, err = predict_main(store, capsys, str(images), "--out", str(earlier))
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1:] == [  # after mlflow's download progress bar
        f"resnet-sweep predict: {images}: none of its 2 file(s) could be read as an image (e.g. "
        f"{images / 'broken.png'}: cannot identify image file '{images / 'broken.png'}'); fix them or give the "
        f"folder holding the images to predict; {earlier} was not written"
    ]
    assert earlier.read_text() == OLD


def test_a_failed_write_keeps_the_earlier_csv_whole(store, tmp_path, earlier, capsys, monkeypatch):
    """The disk fills up after the first row: no half-written CSV, no temporary file left, one line."""
    from resnet_sweep.tools import predict

    images = tmp_path / "new"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (200, 30 * i, 30)).save(images / f"ok{i}.png")
    real_writer = csv.writer

    class DiskFull:
        def __init__(self, f):
            self.writer, self.rows = real_writer(f), 0

        def writerow(self, row):
            if self.rows == 2:
                raise OSError(28, "No space left on device")
            self.rows += 1
            return self.writer.writerow(row)

    monkeypatch.setattr(predict.csv, "writer", DiskFull)
    rc, out, err = predict_main(store, capsys, str(images), "--out", str(earlier))
    assert rc == 1, out + err
    assert "Traceback" not in err and err.strip().splitlines()[-1:] == [
        f"resnet-sweep predict: --out {earlier}: cannot write it (No space left on device); {earlier} is left as "
        "it was; choose another --out or free some space"
    ]
    assert earlier.read_text() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "predictions.csv"]

    monkeypatch.undo()  # space again: the new CSV replaces the old one whole, with the ordinary mode
    old_umask = os.umask(0o022)
    try:
        rc, out, err = predict_main(store, capsys, str(images), "--out", str(earlier))
    finally:
        os.umask(old_umask)
    assert rc == 0, err
    with open(earlier) as f:
        assert sorted(Path(r["path"]).name for r in csv.DictReader(f)) == ["ok0.png", "ok1.png", "ok2.png"]
    assert stat.S_IMODE(earlier.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "predictions.csv"]


def test_a_model_trained_with_resize_predicts_tiles_smaller_than_its_crop(store, tmp_path, capsys):
    """backbone.resize=32 trained on any tile size; predict resizes as training did instead of refusing
    every tile smaller than the 32 crop."""
    images = tmp_path / "new"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 24), (200, 30 * i, 30)).save(images / f"small{i}.png")
    rc, out, err = predict_main(store, capsys, str(images), "--out", str(tmp_path / "pred.csv"))
    assert rc == 0, err
    assert out.startswith("3 predictions from run ") and "could not be read" not in err
