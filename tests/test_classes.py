"""Any number of classes (issue 16): two keep the study's one logit and BCE (and its numbers), three
or more train N logits with cross-entropy and are measured, logged, served and predicted as such."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import FAST, client_for, compose_cfg, hydra_conf, make_tree, mlflow_runs, run_app
from hydra import compose

from resnet_sweep.core.errors import UserError
from resnet_sweep.data import demo_data, image_folder, images
from resnet_sweep.training import metrics, models

THREE = ("a_class", "b_class", "c_class")


def test_three_class_run_logs_macro_metrics_a_3x3_confusion_and_predicts_3_columns(tmp_path):
    root = make_tree(tmp_path / "tiles", classes=THREE)
    run_app(tmp_path, *FAST, "data=imagefolder", f"data.root={root}", "trainer.max_epochs=2", "tracking.log_model=all")
    run = mlflow_runs(tmp_path).all[0]
    assert run.info.status == "FINISHED"
    client = client_for(tmp_path)
    for key in ("valid/loss", "valid/acc", "valid/balanced_acc", "valid/auroc"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2]
    for key in ("test/loss", "test/acc", "test/auroc", "test/f1", "test/balanced_acc"):
        assert 0 <= run.data.metrics[key] <= (10 if key == "test/loss" else 1)
    matrix = json.loads(_artifact(client, run, "confusion_matrix.json"))
    assert matrix["classes"] == list(THREE)
    cells = matrix["matrix (rows: true, cols: predicted)"]
    assert len(cells) == 3 and all(len(r) == 3 for r in cells)
    assert [sum(r) for r in cells] == [3, 3, 3]  # the test split's tiles per true class

    # the logged model serves one probability per class, and its signature says so
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert mlflow.models.get_model_info(logged.model_uri).signature.outputs.inputs[0].shape == (-1, 3)
    served = mlflow.pyfunc.load_model(logged.model_uri)
    probs = np.asarray(served.predict(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)

    out = tmp_path / "pred.csv"
    _predict(tmp_path, root / "test", run.info.run_id, out)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "p_a_class", "p_b_class", "p_c_class", "label"]
    assert len(rows) == 9
    for r in rows:
        probs = [float(r[f"p_{c}"]) for c in THREE]
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        assert r["label"] == THREE[probs.index(max(probs))]


def _artifact(client, run, path: str) -> str:
    local = client.download_artifacts(run.info.run_id, path)
    with open(local) as f:
        return f.read()


def _predict(cwd, images_dir, run_id, out):
    from resnet_sweep.tools import predict

    return predict.predict(str(images_dir), run_id, False, "resnet-sweep", f"sqlite:///{cwd}/mlflow.db", str(out))


# Recorded before issue 16 (commit d8db706, one logit + BCE only): the same fixed-seed run, on an
# AVX-512 CPU. Other CPUs' kernels round differently (an AVX2-only AMD EPYC gives test/loss 0.503202,
# +0.09%, and valid/loss 0.533926, -0.17%), so the losses are compared to 0.5%: far below what a
# change to the run moves them (lr 1.1e-2 instead of 1e-2: -2.6% and -2.3%; another seed or head:
# +11% or more).
BEFORE = {"test/loss": 0.5027435223261515, "test/acc": 1.0, "valid/loss": 0.5348500609397888}


def test_two_classes_give_the_numbers_they_gave_before(tmp_path):
    root = make_tree(tmp_path / "tiles")
    run_app(tmp_path, *FAST, "data=imagefolder", f"data.root={root}", "trainer.max_epochs=2", "optimizer.lr=1e-2")
    metrics = mlflow_runs(tmp_path).all[0].data.metrics
    for key, value in BEFORE.items():
        assert metrics[key] == pytest.approx(value, rel=5e-3), key


def test_heads_are_sized_from_the_classes():
    cfg = compose_cfg(*FAST, "head=mlp_relu")
    two = models.build_classifier(cfg.backbone, cfg.head, num_classes=2).model
    five = models.build_classifier(cfg.backbone, cfg.head, num_classes=5).model
    x = torch.zeros(4, 3, 32, 32)
    assert two.eval()(x).shape == (4,)
    assert five.eval()(x).shape == (4, 5)
    assert models.ProbabilityModel(five)(x).sum(-1).tolist() == pytest.approx([1.0] * 4, abs=1e-5)


def test_three_class_loss_is_cross_entropy_and_two_class_loss_is_bce():
    logits3, y3 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2])
    assert metrics.criterion(3)(logits3, metrics.targets(y3, 3)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits3, y3))
    )
    logits2, y2 = torch.tensor([0.5, -2.0]), torch.tensor([1, 0])
    assert metrics.criterion(2)(logits2, metrics.targets(y2, 2)) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits2), y2.float()))
    )


def test_a_class_folder_missing_from_one_split_is_named(tmp_path):
    root = make_tree(tmp_path / "tiles", classes=THREE)
    for f in (root / "valid" / "c_class").iterdir():
        f.unlink()
    (root / "valid" / "c_class").rmdir()
    with pytest.raises(UserError) as e:
        images.scan_tree(root, 32)
    assert "valid/ has no folder 'c_class'" in str(e.value) and "\n" not in str(e.value)


def test_demo_data_has_an_optional_third_tissue_type(tmp_path):
    with hydra_conf():
        over = [f"data.cache_dir={tmp_path}", "data.tiles_per_slide=1", "data.slides_per_class=[1,1,1]"]
        two = compose("train", overrides=over)
        three = compose("train", overrides=[*over, "data.classes=3"])
        bad = compose("train", overrides=[*over, "data.classes=4"])
    root2, root3 = demo_data.ensure(two.data), demo_data.ensure(three.data)
    assert root2 != root3
    assert image_folder.class_folders(root2 / "train") == ["differentiating", "poorly_differentiated"]
    assert image_folder.class_folders(root3 / "test") == ["differentiating", "poorly_differentiated", "stroma"]
    with pytest.raises(UserError, match=r"data.classes=4: the demo data has 2 or 3 classes"):
        demo_data.ensure(bad.data)
