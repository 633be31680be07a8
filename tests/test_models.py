"""Backbones, heads, freezing and where weights come from."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, compose_cfg
from hydra.utils import instantiate
from torch import nn

from resnet_sweep.core.errors import UserError
from resnet_sweep.data import loading
from resnet_sweep.training import engine, models


@pytest.mark.parametrize("in_features", [512, 2048])
def test_heads_have_the_study_layer_shapes(in_features):
    expected = {
        "linear": [(nn.Linear, in_features, 1)],
        "mlp_relu": [(nn.Linear, in_features, 256), (nn.ReLU,), (nn.Linear, 256, 1)],
        "mlp_leakyrelu_dropout": [
            (nn.Linear, in_features, 256),
            (nn.LeakyReLU,),
            (nn.Dropout, 0.5),
            (nn.Linear, 256, 1),
        ],
    }
    for name, layers in expected.items():
        head = instantiate(compose_cfg(f"head={name}").head, in_features=in_features)
        assert len(head) == len(layers), name
        for module, spec in zip(head, layers):
            assert type(module) is spec[0], (name, module)
            if spec[0] is nn.Linear:
                assert (module.in_features, module.out_features) == spec[1:], (name, module)
            if spec[0] is nn.Dropout:
                assert module.p == spec[1]


@pytest.mark.parametrize("backbone,in_features", [("resnet18", 512), ("resnet50", 2048)])
def test_head_in_features_follow_the_backbone(backbone, in_features):
    cfg = compose_cfg(f"backbone={backbone}", "backbone.weights=none", "head=mlp_relu")
    built = models.build_classifier(cfg.backbone, cfg.head)
    assert built.in_features == in_features
    assert built.model.head[0].in_features == in_features
    out = built.model.eval()(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2,)  # one logit per image


def test_frozen_backbone_parameters_and_bn_buffers_are_bit_identical_after_training(tiny_tree):
    cfg = compose_cfg(
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "trainer.max_epochs=2",
        "optimizer.lr=0.1",
        "head=mlp_leakyrelu_dropout",
    )
    splits = loading.load_splits(cfg.data, cfg.trainer, crop_size=32)
    built = models.build_classifier(cfg.backbone, cfg.head)
    before = {k: v.clone() for k, v in built.model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in built.model.head.state_dict().items()}
    assert any("running_mean" in k for k in before)
    engine.fit(
        built.model,
        splits,
        cfg.optimizer,
        cfg.trainer,
        lambda e, m: None,
        "valid/loss",
        state_fn=lambda: models.trainable_state(built.model),
        device=torch.device("cpu"),
    )
    after = built.model.backbone.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"backbone tensor {k} changed"
    assert any(not torch.equal(v, built.model.head.state_dict()[k]) for k, v in head_before.items())
    # and the frozen backbone stays in eval mode whatever train() says
    built.model.train()
    assert all(not m.training for m in built.model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert built.model.head.training


def test_full_finetune_trains_the_backbone():
    cfg = compose_cfg("backbone.weights=none", "backbone.freeze=none")
    built = models.build_classifier(cfg.backbone, cfg.head)
    n_trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in built.model.parameters())
    assert len(models.trainable_state(built.model)) == len(built.model.state_dict())


def test_imagenet_weights_are_read_from_the_torch_home_cache(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    torch.manual_seed(123)
    reference = resnet18().state_dict()
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    filename = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save(reference, checkpoints / filename)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    cfg = compose_cfg("backbone=resnet18", "backbone.weights=imagenet")
    built = models.build_classifier(cfg.backbone, cfg.head)
    assert built.weights_source == "imagenet:ResNet18_Weights.IMAGENET1K_V1"
    loaded = built.model.backbone.state_dict()
    assert torch.equal(loaded["conv1.weight"], reference["conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.running_var"], reference["layer4.1.bn2.running_var"])


def test_imagenet_weights_unavailable_is_an_error_or_a_loud_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    # no network here and an empty cache: `imagenet` refuses, naming where the file should go
    cfg = compose_cfg("backbone.weights=imagenet")
    with pytest.raises(UserError, match=r"backbone.weights=imagenet: cannot load .*hub/checkpoints/resnet18-"):
        models.build_classifier(cfg.backbone, cfg.head)
    # `auto` falls back to random weights with a warning, and says so in weights_source
    cfg = compose_cfg("backbone.weights=auto")
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        built = models.build_classifier(cfg.backbone, cfg.head)
    assert built.weights_source == "random (ImageNet weights unavailable)"


def test_weights_from_a_state_dict_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(7)
    state = resnet18().state_dict()
    torch.save(state, tmp_path / "mine.pt")
    cfg = compose_cfg(f"backbone.weights={tmp_path / 'mine.pt'}")
    built = models.build_classifier(cfg.backbone, cfg.head)
    assert built.weights_source.startswith(f"file:{tmp_path / 'mine.pt'} sha256:")
    assert torch.equal(built.model.backbone.state_dict()["conv1.weight"], state["conv1.weight"])


def test_checkpoint_rebuilds_the_model_and_refuses_another_backbone(tmp_path):
    cfg = compose_cfg("backbone.weights=none", "head=mlp_relu", "seed=3")
    built = models.build_classifier(cfg.backbone, cfg.head, seed=3)
    with torch.no_grad():
        built.model.head[0].weight.mul_(2)
    state = models.trainable_state(built.model)
    assert all(k.startswith("head.") for k in state)  # a few KB, not the backbone again
    ckpt = models.checkpoint(built, state, cfg, {"classes": ["a", "b"]})
    torch.save(ckpt, tmp_path / "best.pt")
    rebuilt, meta = models.load_checkpoint(tmp_path / "best.pt")
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(rebuilt(x), built.model.eval()(x))
    assert meta["classes"] == ["a", "b"]

    ckpt["head"]["_target_"] = "resnet_sweep.models.Head"  # a checkpoint written before the package layout
    torch.save(ckpt, tmp_path / "older.pt")
    assert torch.allclose(models.load_checkpoint(tmp_path / "older.pt")[0](x), built.model(x))

    ckpt["frozen_checksum"] = "0" * 64
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(UserError, match="differs from the one this checkpoint was trained with"):
        models.load_checkpoint(tmp_path / "other.pt")
