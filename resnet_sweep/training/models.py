"""torchvision backbone + the study's heads, with freezing and where the weights came from.

Heads output logits: the study's Sigmoid lives in BCEWithLogitsLoss during training (the same maths,
numerically stable) and in ``ProbabilityModel`` at prediction time. Two classes: one logit (the study);
three or more: one logit per class (cross-entropy, softmax at prediction time).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchvision import models as tvm

from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.training.metrics import probabilities

log = logging.getLogger(__name__)


class Head(nn.Sequential):
    """``Linear(in, out)``, or ``Linear(in, hidden) + activation [+ Dropout] + Linear(hidden, out)``;
    ``out_features`` is sized from the data (``outputs_for``): 1 for two classes, N for N >= 3."""

    def __init__(
        self,
        in_features: int,
        name: str = "head",
        hidden: int | None = None,
        activation: nn.Module | None = None,
        dropout: float = 0.0,
        out_features: int = 1,
    ):
        if hidden is None:
            layers = [nn.Linear(in_features, out_features)]
        else:
            layers = [nn.Linear(in_features, hidden)]
            if activation is not None:
                layers.append(activation)
            if dropout:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(hidden, out_features))
        super().__init__(*layers)
        self.name = name


class Classifier(nn.Module):
    """``head(backbone(x))`` -> one logit per image (two classes) or N per image. Frozen backbone modules stay in eval mode
    whatever ``train()`` says, so their BatchNorm statistics never change."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(-1)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.backbone.modules():
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()  # nothing in it trains: BatchNorm statistics and dropout stay fixed
        return self


def outputs_for(num_classes: int) -> int:
    """The head's output size: one logit for two classes (the study's BCE), else one per class."""
    return 1 if int(num_classes) == 2 else int(num_classes)


class ProbabilityModel(nn.Module):
    """What MLflow serves: normalised 3xHxW images in; P(second class) out for two classes, one
    probability per class (N x C) for three or more."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probabilities(self.classifier(x))


@dataclass
class Built:
    model: Classifier
    weights_source: str  # imagenet:<enum> | random | random (ImageNet weights unavailable) | file:<path>
    in_features: int
    frozen_checksum: str  # sha256 of everything that does not train: rebuilding must reproduce it
    trainable_params: int  # head included
    total_params: int


def available_backbones() -> list[str]:
    return sorted(tvm.list_models(module=tvm))


def load_backbone(cfg) -> tuple[nn.Module, str]:
    """The torchvision model named ``cfg.name`` with weights per ``cfg.weights``
    (auto | imagenet | none | path to a state dict), and a description of where they came from."""
    name, choice = str(cfg.name), str(cfg.weights)
    if name not in available_backbones():
        raise UserError(f"backbone.name={name}: not a torchvision classification model")
    kwargs = OmegaConf.to_container(cfg.model_kwargs, resolve=True) if cfg.get("model_kwargs") else {}
    if choice == "none":
        return tvm.get_model(name, weights=None, **kwargs), "random"
    if choice in ("auto", "imagenet"):
        try:
            enum = tvm.get_model_weights(name)[str(cfg.imagenet_weights)]
        except KeyError:
            members = ", ".join(w.name for w in tvm.get_model_weights(name))
            raise UserError(
                f"backbone.imagenet_weights={cfg.imagenet_weights}: not a weights enum of {name}; "
                f"choose one of {members}"
            ) from None
        try:
            return tvm.get_model(name, weights=enum, **kwargs), f"imagenet:{enum}"
        except Exception as e:  # no network, no cache, corrupt file
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            why = f"{type(e).__name__}: {first_line(e)}"
            if choice == "imagenet":
                raise UserError(
                    f"backbone.weights=imagenet: cannot load {enum} ({why}); put the file at {cache} "
                    "or use backbone.weights=auto|none|/path/to/state_dict.pt"
                ) from None
            msg = (
                f"ImageNet weights {enum} unavailable ({why}): the {name} backbone is RANDOMLY "
                f"INITIALISED. Results are not transfer learning. Put the file at {cache} or "
                "set backbone.weights=imagenet to make this an error."
            )
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
            return tvm.get_model(name, weights=None, **kwargs), "random (ImageNet weights unavailable)"
    path = Path(os.path.expanduser(choice))
    if not path.is_file():
        raise UserError(f"backbone.weights={choice}: no such file; use auto, imagenet, none or a path to a state dict")
    model = tvm.get_model(name, weights=None, **kwargs)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    except Exception as e:
        raise UserError(f"backbone.weights={choice}: not a {name} state dict ({first_line(e)})") from None
    return model, f"file:{path.resolve()} sha256:{_file_sha256(path)[:12]}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the model's ImageNet classification layer (its last ``nn.Linear``: ``fc`` of ResNet and
    Inception, ``classifier[-1]`` of VGG, ConvNeXt and EfficientNet) by Identity; return its
    in_features. Auxiliary classifiers (Inception's ``AuxLogits``) are removed: only the main output
    feeds the head."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if getattr(model, aux, None) is not None:
                setattr(model, aux, None)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"backbone {type(model).__name__}: no Linear classification layer to replace")
    name = linears[-1]
    in_features = model.get_submodule(name).in_features
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return model, in_features


def parameterised_layers(backbone: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own (Conv, BatchNorm, Linear, ...), input to
    output in definition order: what ``backbone.unfreeze=N`` counts from the end."""
    return [name for name, m in backbone.named_modules() if any(True for _ in m.parameters(recurse=False))]


def apply_freeze(model: Classifier, backbone_cfg) -> None:
    """``all``: head only; ``none``: everything; ``last_n``: the last ``backbone.unfreeze`` parameterised
    layers; ``stages``: the named submodules in ``backbone.stages`` (e.g. ``[layer4]``)."""
    freeze = str(backbone_cfg.freeze)
    backbone = model.backbone
    if freeze == "all":
        backbone.requires_grad_(False)
    elif freeze == "none":
        backbone.requires_grad_(True)
    elif freeze == "last_n":
        n = backbone_cfg.get("unfreeze")
        layers = parameterised_layers(backbone)
        if not isinstance(n, int) or not 1 <= n <= len(layers):
            raise UserError(
                f"backbone.unfreeze={n}: with backbone.freeze=last_n, give the number of parameterised "
                f"layers to train, counted from the output (1..{len(layers)} for {backbone_cfg.name})"
            )
        backbone.requires_grad_(False)
        for name in layers[-n:]:
            backbone.get_submodule(name).requires_grad_(True)
    elif freeze == "stages":
        stages = backbone_cfg.get("stages")
        if not stages or isinstance(stages, str):
            raise UserError(
                "backbone.stages: with backbone.freeze=stages, give a list of submodule names, "
                "e.g. backbone.stages=[layer4]"
            )
        backbone.requires_grad_(False)
        for stage in stages:
            try:
                module = backbone.get_submodule(str(stage))
            except AttributeError:
                top = ", ".join(n for n, m in backbone.named_children() if any(True for _ in m.parameters()))
                raise UserError(
                    f"backbone.stages={list(stages)}: {backbone_cfg.name} has no submodule '{stage}'; "
                    f"its stages are {top} (nested names with dots, e.g. layer4.1)"
                ) from None
            module.requires_grad_(True)
    else:
        raise UserError(
            f"backbone.freeze={freeze}: choose all (train the head only), none (fine-tune everything), "
            "last_n (with backbone.unfreeze=N) or stages (with backbone.stages=[...])"
        )
    model.train()


def check_head(head_cfg) -> None:
    """Build the configured head once, small (4 features in): a key its builder does not take
    (``+head.dropuot=0.1``) or a value it refuses is one line here, before any run (``preflight``)."""
    try:
        instantiate(head_cfg, in_features=4, out_features=1)
    except Exception as e:  # hydra's "Error in call to target '...':" then the builder's own error
        why = next((line for line in str(e).splitlines() if line.strip() and not line.endswith(":")), str(e))
        named = [f"head.{k}={v}" for k, v in head_cfg.items() if not str(k).startswith("_") and str(k) in why]
        where = named[0] if named else f"head={head_cfg.get('name', '?')}"
        raise UserError(f"{where}: {why.strip()}; check the head.* values") from None


def build_classifier(backbone_cfg, head_cfg, seed: int = 0, num_classes: int = 2) -> Built:
    """Backbone + head for ``num_classes`` classes, deterministic for a given seed (random inits
    included), freezing applied."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, source = load_backbone(backbone_cfg)
        backbone, in_features = strip_classifier(backbone)
        head = instantiate(head_cfg, in_features=in_features, out_features=outputs_for(num_classes))
    model = Classifier(backbone, head)
    apply_freeze(model, backbone_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Built(model, source, in_features, frozen_checksum(model), trainable, total)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train, and the buffers of modules that train (BatchNorm statistics)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    for mod_name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            names.update(f"{mod_name}.{b}" if mod_name else b for b, _ in module.named_buffers(recurse=False))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def frozen_checksum(model: nn.Module) -> str:
    keep = set(trainable_state(model))
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if k not in keep:
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint(built: Built, state: dict[str, torch.Tensor], cfg, extra: dict) -> dict:
    """What rebuilds the model: the trainable tensors plus the configs and seed that rebuild the
    rest. Loadable with ``torch.load(..., weights_only=True)``."""
    return {
        "format": "resnet-sweep/1",
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True, enum_to_str=True),
        "head": OmegaConf.to_container(cfg.head, resolve=True, enum_to_str=True),
        "seed": int(cfg.seed),
        "weights_source": built.weights_source,
        "frozen_checksum": built.frozen_checksum,
        "state": state,
        **extra,
    }


def load_checkpoint(path) -> tuple[Classifier, dict]:
    """Rebuild the classifier a checkpoint was trained as; refuse if the frozen part differs."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "resnet-sweep/1":
        raise UserError(f"{path}: not a resnet-sweep checkpoint")
    head = {**ckpt["head"]}
    if head.get("_target_") == "resnet_sweep.models.Head":  # written before the modules moved into packages
        head["_target_"] = f"{Head.__module__}.Head"
    built = build_classifier(
        OmegaConf.create(ckpt["backbone"]), OmegaConf.create(head), ckpt["seed"], len(ckpt.get("classes", "ab"))
    )
    if built.frozen_checksum != ckpt["frozen_checksum"]:
        raise UserError(
            f"{path}: the frozen backbone rebuilt from {built.weights_source} differs from the one "
            f"this checkpoint was trained with ({ckpt['weights_source']}); make the same weights "
            "available (backbone.weights)"
        )
    built.model.load_state_dict(ckpt["state"], strict=False)
    built.model.eval()
    return built.model, ckpt
