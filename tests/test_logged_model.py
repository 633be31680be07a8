"""A run's model is logged with its pip requirements as given, never inferred by MLflow (which
imports and scans the environment each time)."""

from __future__ import annotations

import mlflow
import pytest
import torchvision
from conftest import fresh_store

from resnet_sweep.tracking import logged


def test_a_model_is_logged_without_inferring_its_requirements(tmp_path, monkeypatch):
    def infer(*args, **kwargs):
        pytest.fail("MLflow inferred the model's pip requirements")

    monkeypatch.setattr("mlflow.models.infer_pip_requirements", infer)
    monkeypatch.setattr("mlflow.utils.environment._infer_requirements", infer)
    fresh_store(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("logged-model")  # not the experiment an earlier test of this process set
    try:
        classifier = torchvision.models.resnet18(num_classes=1)
        ckpt = {"crop_size": 32, "epoch": 1, "classes": ["a", "b"], "mean": [0.5] * 3, "std": [0.2] * 3}
        with mlflow.start_run() as run:
            logged.log_model(classifier, ckpt, "resnet18-linear-sgd-lr1e-03-s0")
        (model,) = mlflow.search_logged_models(output_format="list", filter_string=f"source_run_id='{run.info.run_id}'")
        requirements_txt = mlflow.artifacts.download_artifacts(
            f"{model.artifact_location}/requirements.txt", dst_path=str(tmp_path / "m")
        )
        lines = open(requirements_txt).read().split()
        assert any(line.startswith("torch==") for line in lines) and "torchvision" in lines
    finally:
        mlflow.set_tracking_uri(None)


def test_the_model_description_says_what_goes_in_and_out_and_warns_of_random_weights():
    ckpt = {
        "classes": ["a", "b", "c"],
        "crop_size": 224,
        "epoch": 4,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "backbone": {"name": "resnet50"},
        "head": {"name": "mlp_relu"},
        "weights_source": "imagenet:IMAGENET1K_V2",
    }
    note = logged.model_description(ckpt, "resnet50-mlp_relu-adamw-lr1e-04-s0")
    assert note.startswith("**resnet50-mlp_relu-adamw-lr1e-04-s0** at its best epoch 4: resnet50 with a mlp_relu head")
    assert "N x 3 x 224 x 224" in note and "mean (0.485, 0.456, 0.406)" in note
    assert "Out: one probability per class, N x 3 (a, b, c)" in note and "random" not in note
    random = logged.model_description({**ckpt, "weights_source": "random"}, "r")
    assert random.startswith("**Backbone weights: random. Not transfer learning")
