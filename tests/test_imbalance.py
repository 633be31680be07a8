"""Imbalanced classes (issue 16): the balanced sampler, class weights in the loss, validation
objectives that read imbalance right (balanced accuracy, AUROC), class counts on the runs."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch
from conftest import FAST, client_for, hydra_conf, make_tree, mlflow_runs, run_app
from hydra import compose

from resnet_sweep.config import checks
from resnet_sweep.config.objective import direction
from resnet_sweep.core.errors import UserError
from resnet_sweep.data import crops, loading
from resnet_sweep.training import features, metrics


def imbalanced_tree(root, majority=18, minority=2):
    """train: ``majority`` a_class and ``minority`` b_class tiles; valid and test 3 of each."""
    make_tree(root, per_class=(majority, 3, 3))
    for f in sorted((root / "train" / "b_class").iterdir())[minority:]:
        f.unlink()
    return root


def test_the_balanced_sampler_draws_the_classes_1_to_1_on_a_1_to_9_set_reproducibly():
    labels = np.array([0] * 900 + [1] * 100)
    order = crops.epoch_order(labels, seed=0, epoch=1, sampler="balanced")
    assert len(order) == 1000
    share = labels[order].mean()
    assert abs(share - 0.5) < 5 * math.sqrt(0.25 / 1000)  # 5 standard deviations of a fair draw
    assert np.array_equal(order, crops.epoch_order(labels, seed=0, epoch=1, sampler="balanced"))
    assert not np.array_equal(order, crops.epoch_order(labels, seed=0, epoch=2, sampler="balanced"))
    # shuffle: every sample once, in the order it always had
    assert np.array_equal(crops.epoch_order(labels, 0, 1), crops.shuffled(1000, 0, 1))


def test_every_training_loader_follows_the_sampler(tmp_path):
    """PIL loader, tile-store loader and feature-bank loader draw the same balanced epochs."""
    root = imbalanced_tree(tmp_path / "tiles", majority=27, minority=3)
    with _conf():
        cfg = compose("train", overrides=[*FAST, "data=imagefolder", f"data.root={root}", "data.sampler=balanced"])
    labels = []
    for tile_store in ("off", "auto"):
        cfg.data.tile_store = tile_store
        cfg.data.cache_dir = str(tmp_path / "cache")
        splits = loading.job_splits(cfg, torch.device("cpu"))
        assert splits.sampler == "balanced"
        splits.train.set_epoch(1)
        labels.append(torch.cat([y for _, y in splits.train]).tolist())
    truth = [y for _, y in splits.train.dataset.samples]
    expected = [truth[i] for i in crops.epoch_order(truth, int(cfg.seed), 1, "balanced")]
    assert labels == [expected, expected]
    assert 0.2 < sum(expected) / len(expected) < 0.8  # 3 of 30 tiles are b_class, drawn ~half the time

    class Bank:
        views = 1

        def array(self, split):
            return np.zeros((len(truth), 4), dtype=np.float32)

        def labels(self, split):
            return torch.tensor(truth)

    bank_loader = features.BankLoader(Bank(), "train", 8, shuffle=True, seed=int(cfg.seed), sampler="balanced")
    bank_loader.set_epoch(1)
    assert torch.cat([y for _, y in bank_loader]).tolist() == expected


def _conf():
    return hydra_conf()


def test_weighted_losses_equal_their_formulas():
    logits, y = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 2, 2])
    w = [1.0, 2.0, 3.0]
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expected = float((torch.tensor(w)[y] * ce).sum() / torch.tensor(w)[y].sum())
    assert float(metrics.criterion(3, weight=w)(logits, y)) == pytest.approx(expected, rel=1e-6)

    z, t = torch.tensor([0.3, -1.2, 2.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    w0, w1 = 0.5, 4.5  # two classes: pos_weight = w1 / w0
    p = torch.sigmoid(z)
    expected = float((-(w1 / w0) * t * torch.log(p) - (1 - t) * torch.log(1 - p)).mean())
    assert float(metrics.criterion(2, weight=[w0, w1])(z, t)) == pytest.approx(expected, rel=1e-5)


def test_class_weights_from_the_config():
    assert metrics.class_weights("none", [90, 10], ["a", "b"]) is None
    assert metrics.class_weights("balanced", [90, 10], ["a", "b"]) == pytest.approx([100 / 180, 100 / 20])
    assert metrics.class_weights([1, 9], [90, 10], ["a", "b"]) == [1.0, 9.0]
    with pytest.raises(UserError) as e:
        metrics.class_weights([1, 2], [5, 5, 5], ["a", "b", "c"])
    assert str(e.value) == (
        "loss.class_weight=[1.0, 2.0]: 2 weight(s) for 3 classes (a, b, c); give one per class folder, in this order"
    )
    with pytest.raises(UserError, match=r"^loss.class_weight=heavy: choose none, balanced"):
        checks.class_weight({"class_weight": "heavy"})
    with pytest.raises(UserError, match=r"^loss.class_weight=\[1, -2\]: choose none, balanced"):
        checks.class_weight({"class_weight": [1, -2]})
    with pytest.raises(UserError, match=r"^data.sampler=even: choose shuffle"):
        checks.check_sampler("even")


def test_balanced_acc_and_auroc_are_objectives_to_maximise():
    assert direction("valid/balanced_acc") == "maximize" and direction("valid/auroc") == "maximize"
    with pytest.raises(UserError, match="objective=valid/f1"):
        direction("valid/f1")


def best_epoch_is_the_argmax(client, run, metric: str) -> None:
    history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    values = [m.value for m in history]
    assert int(run.data.metrics["best_epoch"]) == values.index(max(values)), (run.info.run_name, values)
    assert run.data.metrics[f"best/{metric}"] == pytest.approx(max(values))


def test_a_grid_on_valid_balanced_acc_picks_its_best_epoch_and_tags_the_class_counts(tmp_path):
    root = imbalanced_tree(tmp_path / "tiles")
    run_app(
        tmp_path,
        "-m",
        *FAST,
        "data=imagefolder",
        f"data.root={root}",
        "trainer.max_epochs=3",
        "trainer.patience=null",
        "objective=valid/balanced_acc",
        "data.sampler=balanced",
        "loss.class_weight=balanced",
        "optimizer.lr=1e-2,1e-3",
    )
    runs = mlflow_runs(tmp_path)
    client = client_for(tmp_path)
    assert len(runs.children) == 2
    for run in runs.children:
        assert run.info.status == "FINISHED"
        best_epoch_is_the_argmax(client, run, "valid/balanced_acc")
        assert run.data.tags["class_counts.train"] == "a_class 18, b_class 2"
        assert run.data.tags["class_counts.test"] == "a_class 3, b_class 3"
    report = run_app(tmp_path, "report", module="resnet_sweep.tools.cli").stdout
    assert (
        "Tiles per class: train: a_class 18, b_class 2; valid: a_class 3, b_class 3; test: a_class 3, b_class 3."
        in report
    )


def test_an_optuna_search_on_valid_balanced_acc_maximises_it(tmp_path, tiny_tree):
    run_app(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.storage=sqlite:///optuna.db",
        "hydra.sweeper.study_name=balanced",
        "optimizer.lr=choice(1e-2, 1e-3)",
        "trainer.max_epochs=2",
        "objective=valid/balanced_acc",
    )
    study = optuna.load_study(study_name="balanced", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    client = client_for(tmp_path)
    runs = {r.data.tags["optuna_trial"]: r for r in mlflow_runs(tmp_path).children}
    for trial in study.trials:
        run = runs[str(trial.number)]
        best_epoch_is_the_argmax(client, run, "valid/balanced_acc")
        assert trial.value == pytest.approx(run.data.metrics["best/valid/balanced_acc"], rel=1e-5)
