"""Beyond the linear probe: freeze modes, discriminative LR, LR schedulers, other torchvision backbones."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST, client_for, compose_cfg, make_tree, mlflow_runs, run_app
from omegaconf import OmegaConf

import resnet_sweep.config.resolvers  # noqa: F401  (rs.* resolvers used by the configs)
from resnet_sweep.core.errors import UserError
from resnet_sweep.training import models, optimizers

# resnet18 without its fc: 11,176,512 parameters; layer4: 8,393,728; layer4.1.bn2: 2 x 512;
# layer4.1.conv2: 512 x 512 x 3 x 3 = 2,359,296; the linear head: 512 + 1 = 513.
HEAD = 513
COUNTS = {
    "all": HEAD,
    "none": 11_176_512 + HEAD,
    "last_n=1": 1_024 + HEAD,  # layer4.1.bn2
    "last_n=2": 1_024 + 2_359_296 + HEAD,  # + layer4.1.conv2
    "stages=[layer4]": 8_393_728 + HEAD,
}
OVERRIDES = {
    "all": ["backbone.freeze=all"],
    "none": ["backbone.freeze=none"],
    "last_n=1": ["backbone.freeze=last_n", "backbone.unfreeze=1"],
    "last_n=2": ["backbone.freeze=last_n", "backbone.unfreeze=2"],
    "stages=[layer4]": ["backbone.freeze=stages", "backbone.stages=[layer4]"],
}


def cfg_with(*overrides):
    return compose_cfg("backbone.weights=none", *overrides)


@pytest.mark.parametrize("mode", list(COUNTS))
def test_trainable_parameter_counts_match_hand_computed_numbers(mode):
    built = models.build_classifier(cfg_with(*OVERRIDES[mode]).backbone, cfg_with().head)
    assert built.trainable_params == COUNTS[mode]
    assert built.total_params == 11_176_512 + HEAD
    # frozen BatchNorm layers stay in eval mode in training, the trainable ones train
    built.model.train()
    for name, module in built.model.backbone.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.training == module.weight.requires_grad, name


def test_unknown_stage_and_bad_unfreeze_are_one_line_errors(tmp_path, tiny_tree):
    common = [*FAST, "data=imagefolder", f"data.root={tiny_tree}"]
    proc = run_app(tmp_path, *common, "backbone.freeze=stages", "backbone.stages=[layer9]", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "backbone.stages=['layer9']: resnet18 has no submodule 'layer9'" in proc.stderr
    assert "layer4" in proc.stderr
    with pytest.raises(UserError, match=r"backbone.unfreeze=None: with backbone.freeze=last_n, give the number"):
        models.build_classifier(cfg_with("backbone.freeze=last_n").backbone, cfg_with().head)
    # a config composed with backbone.freeze=some never gets here (schema.Freeze); a checkpoint's might
    some = OmegaConf.create({**OmegaConf.to_container(cfg_with().backbone, enum_to_str=True), "freeze": "some"})
    with pytest.raises(UserError, match=r"backbone.freeze=some: choose all .* none .* last_n .* stages"):
        models.build_classifier(some, cfg_with().head)


def test_backbone_lr_scale_puts_two_lrs_in_the_optimizer_and_the_run_logs_both(tmp_path, tiny_tree):
    cfg = cfg_with(
        "backbone.freeze=stages",
        "backbone.stages=[layer4]",
        "optimizer=adam",
        "optimizer.lr=1e-3",
        "optimizer.backbone_lr_scale=0.1",
    )
    optimizer = optimizers.make_optimizer(cfg.optimizer, models.build_classifier(cfg.backbone, cfg.head).model)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("head", 1e-3), ("backbone", pytest.approx(1e-4))]
    assert sum(p.numel() for p in optimizer.param_groups[1]["params"]) == 8_393_728
    # frozen backbone: one group only
    cfg = cfg_with("optimizer.backbone_lr_scale=0.1")
    assert (
        len(
            optimizers.make_optimizer(cfg.optimizer, models.build_classifier(cfg.backbone, cfg.head).model).param_groups
        )
        == 1
    )

    run_app(
        tmp_path,
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "backbone.freeze=last_n",
        "backbone.unfreeze=2",
        "optimizer.lr=1e-3",
        "optimizer.backbone_lr_scale=0.1",
        "trainer.max_epochs=2",
    )
    run = mlflow_runs(tmp_path).all[0]
    client = client_for(tmp_path)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr/head")] == [1e-3] * 3
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr/backbone")] == pytest.approx([1e-4] * 3)
    assert run.data.tags["model.trainable_params"] == str(COUNTS["last_n=2"])
    assert "feature_bank" not in run.data.tags  # part of the backbone trains: no bank


def lr_curve(cwd, run):
    return [
        m.value for m in sorted(client_for(cwd).get_metric_history(run.info.run_id, "lr/head"), key=lambda m: m.step)
    ]


def test_each_scheduler_logs_its_lr_curve(tmp_path, tiny_tree):
    common = [
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "optimizer.lr=0.01",
        "trainer.max_epochs=5",
        "trainer.patience=null",
    ]
    run_app(tmp_path, "-m", *common, "scheduler=none,cosine")
    run_app(tmp_path, *common, "scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.5")
    run_app(tmp_path, *common, "scheduler=plateau", "scheduler.patience=0", "scheduler.factor=0.5")
    runs = {r.data.tags["scheduler"]: r for r in mlflow_runs(tmp_path).all if r.data.tags.get("sweep") != "true"}
    assert len(runs) == 4

    # epoch 0 measures at the starting LR; epoch e >= 1 trains at the logged LR
    assert lr_curve(tmp_path, runs["none"]) == [0.01] * 6
    # cosine: 2 warm-up epochs from 0.1 x lr, then cosine annealing over the remaining 3 epochs
    cos = [0.01 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert lr_curve(tmp_path, runs["cosine"]) == pytest.approx([0.001, 0.001, 0.0055, *cos])
    assert lr_curve(tmp_path, runs["step"]) == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.005, 0.0025])
    # plateau: halved after every epoch whose valid/loss did not improve on the best so far
    plateau = runs["plateau"]
    losses = [
        m.value
        for m in sorted(
            client_for(tmp_path).get_metric_history(plateau.info.run_id, "valid/loss"), key=lambda m: m.step
        )
    ]
    expected, lr, best = [0.01, 0.01], 0.01, math.inf
    for loss in losses[1:-1]:
        if loss < best * (1 - 1e-4):
            best = loss
        else:
            lr /= 2
        expected.append(lr)
    assert lr_curve(tmp_path, plateau) == pytest.approx(expected)


NEW_BACKBONES = {
    # name: (extra overrides, tile size) -- Inception needs >= 75 px inputs
    "efficientnet_b0": ([], 40),
    "convnext_tiny": ([], 40),
    "inception_v3": (["backbone.crop_size=80", "backbone.resize=null"], 96),
    "vgg16": ([], 40),
}


@pytest.mark.parametrize(
    "name",
    [
        "efficientnet_b0",
        pytest.param("convnext_tiny", marks=pytest.mark.slow),
        pytest.param("inception_v3", marks=pytest.mark.slow),
        pytest.param("vgg16", marks=pytest.mark.slow),
    ],
)
def test_a_one_epoch_run_works_for_each_new_backbone(tmp_path, name):
    extra, size = NEW_BACKBONES[name]
    tree = make_tree(tmp_path / "tiles", per_class=(4, 2, 2), size=size)
    # part of the backbone trains (the whole model runs forward and backward: Inception's aux head must be gone)
    run_app(
        tmp_path,
        *FAST,
        "data=imagefolder",
        f"data.root={tree}",
        f"backbone={name}",
        *extra,
        "backbone.freeze=last_n",
        "backbone.unfreeze=2",
        "tracking.log_model=none",
        "trainer.batch_size=4",
    )
    run = mlflow_runs(tmp_path).all[0]
    assert run.info.status == "FINISHED", run.data.tags.get("failure_reason")
    assert "test/acc" in run.data.metrics and run.data.params["backbone.name"] == name
    built = models.build_classifier(cfg_with(f"backbone={name}", *extra).backbone, cfg_with().head)
    assert (
        built.in_features == {"efficientnet_b0": 1280, "convnext_tiny": 768, "inception_v3": 2048, "vgg16": 4096}[name]
    )
    assert built.trainable_params == built.in_features + 1  # freeze=all: the head only
