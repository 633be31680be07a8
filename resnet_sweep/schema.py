"""Typed schemas of the config groups ``trainer``, ``backbone``, ``data`` and ``tracking``, in Hydra's
ConfigStore: each group's YAML files start from one of them (``defaults: [<schema>, _self_]``), so
OmegaConf rejects a value of the wrong type (``trainer.batch_size=abc``) while composing, naming
the key. The ranges and choices that a type cannot say are checked after composing (``checks.check_config``,
for every job and sweep point). Imports no torch: ``checks.check_overrides`` checks the command line's
overrides against these before Hydra composes.

Registered by ``register()``, which the Hydra plugin ``hydra_plugins/resnet_sweep_schema`` calls when
Hydra scans its plugins, so ``python train.py``, the compose API and the sweeper plugins all see
them without importing this module themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


@dataclass
class TrainerConf:
    max_epochs: int = 25
    patience: int | None = 10
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    feature_bank: str = "auto"
    batch_heads: str = "auto"
    bank_views: int = 8
    bank_batch_size: int | None = None
    crop_seed: int = 0
    resume: bool = True
    resume_dir: str = ".resnet-sweep/resume"


@dataclass
class BackboneConf:
    name: str = MISSING
    imagenet_weights: str | None = None
    weights: str = "auto"
    freeze: str = "all"
    unfreeze: int | None = None
    stages: list[str] | None = None
    crop_size: int = 224
    resize: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConf:
    kind: str = MISSING
    root: str | None = MISSING
    cache_dir: str = MISSING
    normalize: str = "imagenet"
    on_bad_image: str = "error"
    tile_store: str = "auto"
    tile_store_max_gb: float = 20.0
    tile_store_device: str = "auto"
    augment: list[str] = field(default_factory=list)
    sampler: str = "shuffle"
    group: str | None = None
    group_aggregate: str = "mean"


@dataclass
class DemoDataConf(DataConf):
    kind: str = "demo"
    root: str | None = None
    seed: int = 0
    tile_size: int = 250
    slides_per_class: list[int] = field(default_factory=lambda: [8, 2, 2])
    tiles_per_slide: int = 10
    classes: int = 2


@dataclass
class LossConf:
    class_weight: Any = "none"  # none | balanced | [w1, w2, ...]


@dataclass
class TrackingConf:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "resnet-sweep"
    log_model: str = "best"
    log_checkpoint: bool = True
    retry_s: float = 300.0


# (group, schema name, dataclass): the YAML files of the group list the name first in their defaults
SCHEMAS = (
    ("trainer", "trainer_schema", TrainerConf),
    ("backbone", "backbone_schema", BackboneConf),
    ("data", "imagefolder_schema", DataConf),
    ("data", "demo_schema", DemoDataConf),
    ("tracking", "tracking_schema", TrackingConf),
    ("loss", "loss_schema", LossConf),
)


def register() -> None:
    store = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        store.store(group=group, name=name, node=node)


_KINDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list[str]": "a list, e.g. [a,b]",
    "list[int]": "a list of integers, e.g. [8,2,2]",
    "dict[str, Any]": "a mapping, e.g. {key: value}",
}


def expected(group: str, key: str) -> str | None:
    """What ``group.key`` must be, in words (``"an integer, or null"``), or None when no schema has it."""
    for g, _, node in SCHEMAS:
        for f in fields(node) if g == group else ():
            if f.name == key:
                kind = str(f.type).replace(" | None", "")
                return _KINDS.get(kind, kind) + (", or null" if "None" in str(f.type) else "")
    return None


def type_error(group: str, key: str, value: Any, shown: str | None = None) -> str | None:
    """The one-line error for ``group.key=value`` when the group's schema cannot hold ``value``
    (None when it can, or when no schema knows the key: Hydra reports unknown keys itself).
    ``shown``: the value as the user typed it."""
    for g, _, node in SCHEMAS:
        if g != group:
            continue
        cfg = OmegaConf.structured(node)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except ValidationError:
            top = key.split(".")[0]
            shown = _text(value) if shown is None else shown
            return f"{group}.{key}={shown}: must be {expected(group, top) or 'of another type'}"
        except (ConfigKeyError, ConfigAttributeError):
            continue
        return None
    return None


def _text(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
