"""Slide / patient results (issue 16): ``data.group=REGEX`` aggregates tile probabilities per group
in every validation and test evaluation; a file the regex misses or a group in two classes is one
line naming it."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from conftest import FAST, client_for, make_tree, mlflow_runs, run_app

from resnet_sweep.core.errors import UserError
from resnet_sweep.data import grouping
from resnet_sweep.training import metrics

# 4 slides x 5 tiles with known P(second class); A, B are class 0, C, D class 1
SLIDES = {
    "A": (0, [0.1, 0.2, 0.3, 0.6, 0.2]),  # mean 0.28 -> 0 (right); votes 1/5
    "B": (0, [0.7, 0.8, 0.4, 0.6, 0.5]),  # mean 0.60 -> 1 (wrong); votes 4/5
    "C": (1, [0.9, 0.6, 0.4, 0.7, 0.8]),  # mean 0.68 -> 1 (right); votes 4/5
    "D": (1, [0.3, 0.2, 0.6, 0.4, 0.4]),  # mean 0.38 -> 0 (wrong); votes 1/5
}


def tiles_interleaved():
    """The 20 tiles in loader order, slides interleaved (tile t of every slide, then t + 1)."""
    groups, probs, labels = [], [], []
    for t in range(5):
        for key, (label, ps) in SLIDES.items():
            groups.append(key)
            probs.append(ps[t])
            labels.append(label)
    return torch.tensor(probs), torch.tensor(labels), groups


def test_slide_metrics_equal_a_hand_computation():
    probs, labels, groups = tiles_interleaved()
    results, rows = metrics.group_results(probs, labels, groups, 2, "mean")
    assert [(r["group"], r["class"], r["tiles"], r["predicted"]) for r in rows] == [
        ("A", 0, 5, 0),
        ("B", 0, 5, 1),
        ("C", 1, 5, 1),
        ("D", 1, 5, 0),
    ]
    assert [r["scores"][1] for r in rows] == pytest.approx([0.28, 0.60, 0.68, 0.38])
    # acc 2/4; balanced acc (1/2 + 1/2) / 2; AUROC: of the 4 (positive, negative) pairs, C > A, C > B,
    # D > A rank right and D < B wrong -> 3/4; F1: TP 1 (C), FP 1 (B), FN 1 (D) -> 0.5
    assert results == pytest.approx({"acc": 0.5, "balanced_acc": 0.5, "auroc": 0.75, "f1": 0.5, "n": 4})

    results, rows = metrics.group_results(probs, labels, groups, 2, "majority")
    assert [r["scores"][1] for r in rows] == pytest.approx([0.2, 0.8, 0.8, 0.2])
    assert [r["predicted"] for r in rows] == [0, 1, 1, 0]
    # AUROC on vote shares: C (0.8) > A (0.2) right, C = B and D = A ties (1/2 each), D < B wrong
    assert results == pytest.approx({"acc": 0.5, "balanced_acc": 0.5, "auroc": 0.5, "f1": 0.5, "n": 4})


def test_three_class_groups_take_the_best_mean_probability():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.1, 0.7, 0.2]])
    results, rows = metrics.group_results(probs, torch.tensor([0, 0, 2, 1]), ["s1", "s1", "s2", "s3"], 3)
    assert rows[0]["scores"] == pytest.approx([0.4, 0.3, 0.3]) and rows[0]["predicted"] == 0
    assert [r["predicted"] for r in rows] == [0, 2, 1]
    assert results["acc"] == 1.0 and results["n"] == 3


def slide_tree(root):
    """The tiny tree with slide names: ``<class>/s<label><i // 2>_t<i>.png`` (2 tiles per slide)."""
    make_tree(root)
    for split in ("train", "valid", "test"):
        for label, cls in enumerate(("a_class", "b_class")):
            for f in (root / split / cls).iterdir():
                i = int(f.stem.removeprefix("img"))
                f.rename(f.parent / f"s{label}{i // 2}_t{i}.png")
    return root


def test_a_file_the_regex_misses_and_a_mixed_class_group_are_one_line_each(tmp_path):
    root = make_tree(tmp_path / "tiles")
    files = {s: sorted((root / s).rglob("*.png")) for s in ("train", "valid", "test")}
    with pytest.raises(UserError) as e:
        grouping.file_groups(root, files, r"slide(\d+)")
    assert str(e.value).startswith(
        f"{root / 'train' / 'a_class' / 'img0.png'}: data.group='slide(\\d+)' does not match"
    )
    with pytest.raises(UserError) as e:  # img0 of a_class and img0 of b_class: one "slide" in two classes
        grouping.file_groups(root, files, r"img(\d+)")
    message = str(e.value)
    assert "group '0' of split 'train' has tiles in two classes" in message and "\n" not in message
    assert str(root / "train" / "b_class" / "img0.png") in message


def test_a_run_with_groups_logs_slide_metrics_every_epoch_and_the_test_groups(tmp_path):
    root = slide_tree(tmp_path / "tiles")
    run_app(
        tmp_path,
        "-m",  # a sweep of one job: it has a report
        *FAST,
        "data=imagefolder",
        f"data.root={root}",
        "data.group='^(s\\d+)_'",  # quoted: a regex holds characters Hydra's grammar reads
        "trainer.max_epochs=2",
        "trainer.patience=null",
        "optimizer.lr=1e-2",
        "objective=valid/slide/balanced_acc",
    )
    (run,) = mlflow_runs(tmp_path).children
    client = client_for(tmp_path)
    for key in ("acc", "balanced_acc", "auroc", "f1", "n"):
        history = client.get_metric_history(run.info.run_id, f"valid/slide/{key}")
        assert sorted(m.step for m in history) == [0, 1, 2], key
        assert f"test/slide/{key}" in run.data.metrics
    assert run.data.metrics["test/slide/n"] == 4  # s00, s01 of a_class; s10, s11 of b_class
    values = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "valid/slide/balanced_acc"), key=lambda m: m.step)
    ]
    assert int(run.data.metrics["best_epoch"]) == values.index(max(values))
    text = open(client.download_artifacts(run.info.run_id, "test_groups.csv")).read()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["group", "class", "tiles", "p_a_class", "p_b_class", "predicted"]
    assert sorted((r["group"], r["class"], r["tiles"]) for r in rows) == [
        ("s00", "a_class", "2"),
        ("s01", "a_class", "1"),
        ("s10", "b_class", "2"),
        ("s11", "b_class", "1"),
    ]
    # predict --group: one row per group beside the per-tile CSV; a file the regex misses is one line
    out = tmp_path / "pred.csv"
    cli = ("predict", str(root / "test"), "--run", run.info.run_id, "--out", str(out))
    run_app(tmp_path, *cli, "--group", r"(s\d+)_", module="resnet_sweep.tools.cli")
    with open(tmp_path / "pred_groups.csv") as f:
        grouped = list(csv.DictReader(f))
    assert list(grouped[0]) == ["group", "tiles", "p_a_class", "p_b_class", "predicted"]
    assert sorted((r["group"], r["tiles"]) for r in grouped) == [("s00", "2"), ("s01", "1"), ("s10", "2"), ("s11", "1")]
    with open(out) as f:
        tiles = {r["path"]: float(r["probability"]) for r in csv.DictReader(f)}
    s00 = [p for path, p in tiles.items() if "/s00_" in path]
    assert float(next(r for r in grouped if r["group"] == "s00")["p_b_class"]) == pytest.approx(sum(s00) / 2, abs=1e-5)
    missed = run_app(tmp_path, *cli, "--group", r"slide(\d+)", module="resnet_sweep.tools.cli", check=False)
    assert missed.returncode != 0 and "Traceback" not in missed.stderr
    assert "--group 'slide(\\d+)' does not match" in missed.stderr.strip().splitlines()[-1]
    # the report's study table adds the slide-level columns beside the tile-level ones
    report = run_app(tmp_path, "report", module="resnet_sweep.tools.cli")
    header = next(l for l in report.stdout.splitlines() if l.startswith("| Optimizer"))
    assert header.endswith(
        "| Test loss | Test acc | Test balanced acc | Test AUROC | Test F1 | Slide acc | Slide balanced acc | Slide AUROC |"
    )


def test_slide_objectives_need_data_group(tmp_path, tiny_tree):
    proc = run_app(
        tmp_path, *FAST, "data=imagefolder", f"data.root={tiny_tree}", "objective=valid/slide/acc", check=False
    )
    assert proc.returncode == 2
    assert (
        "objective=valid/slide/acc: slide-level metrics need data.group=REGEX" in proc.stderr.strip().splitlines()[-1]
    )
