"""Typed schemas of the config groups ``trainer``, ``backbone``, ``data``, ``tracking`` and ``loss``,
in Hydra's ConfigStore: each group's YAML files start from one of them (``defaults: [<schema>,
_self_]``), so OmegaConf rejects a value of the wrong type or choice (``trainer.batch_size=abc``,
``data.tile_store=maybe``) while composing. The defaults live here and only here; so do the choices
(Enums) and ranges (``bounded``, ``one_of``), declared beside their fields and turned into one-line
errors by ``schema_errors``, on the command line before Hydra composes (``checks.check_overrides``)
and for every job and sweep point (``checks.check_config``). Imports no torch, no MLflow.

Registered by ``register()``, which the Hydra plugin ``hydra_plugins/resnet_sweep_schema`` calls when
Hydra scans its plugins, so ``python train.py``, the compose API and the sweeper plugins all see
them without importing this module themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SEED_LIMIT = 2**32  # numpy's seeds: 0 .. 2**32 - 1


# Choices. A StrEnum member is its value as a string (``str(x)``, ``f"{x}"``, ``x == "auto"``), so code
# reading a composed config sees the same strings as before; OmegaConf refuses any other value while
# composing, and ``checks.check_overrides`` before that. Member names are the values the YAML files use.
class AutoOff(StrEnum):
    auto = "auto"
    off = "off"


class OnOffAuto(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


class Freeze(StrEnum):
    all = "all"
    none = "none"
    last_n = "last_n"
    stages = "stages"


class Normalize(StrEnum):
    imagenet = "imagenet"
    dataset = "dataset"


class OnBadImage(StrEnum):
    error = "error"
    skip = "skip"


class Sampler(StrEnum):
    shuffle = "shuffle"
    balanced = "balanced"


class GroupAggregate(StrEnum):
    mean = "mean"
    majority = "majority"


class Augment(StrEnum):
    hflip = "hflip"
    vflip = "vflip"
    rot90 = "rot90"


class LogModel(StrEnum):
    all = "all"
    best = "best"
    none = "none"


class DataKind(StrEnum):
    demo = "demo"
    imagefolder = "imagefolder"


def bounded(default: Any, *, ge=None, le=None, lt=None, hint: str = ""):
    """A number field with its range: ``ge`` <= value <= ``le``, value < ``lt``, checked for every job
    and sweep point (``value_error``); ``hint``: what null means, or what to do. A list field may
    carry the same ``metadata`` (each item in range, ``length`` items)."""
    return field(default=default, metadata={"ge": ge, "le": le, "lt": lt, "hint": hint})


def one_of(default: str, choices: tuple[str, ...], hint: str = ""):
    """A string field whose values are a closed list that an Enum cannot name (``32``, ``bf16-mixed``)."""
    return field(default=default, metadata={"choices": choices, "hint": hint})


DEVICE_HINT = "choose auto, cpu, cuda or cuda:N"
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"


@dataclass
class TrainerConf:
    max_epochs: int = bounded(25, ge=1)
    patience: int | None = bounded(10, ge=1, hint="or null to never stop early")
    batch_size: int = bounded(32, ge=1)
    num_workers: int = bounded(2, ge=0)
    device: str = field(default="auto", metadata={"pattern": DEVICE_PATTERN, "hint": DEVICE_HINT})
    precision: str = one_of("auto", ("auto", "bf16", "bf16-mixed", "32", "fp32"), "choose auto, bf16 or 32")
    feature_bank: AutoOff = AutoOff.auto
    batch_heads: AutoOff = AutoOff.auto
    bank_views: int = bounded(8, ge=1)
    bank_batch_size: int | None = bounded(None, ge=1, hint="or null for 64 on a CPU, 256 on a GPU")
    crop_seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    resume: bool = True
    resume_dir: str = ".resnet-sweep/resume"


@dataclass
class BackboneConf:
    name: str = MISSING
    imagenet_weights: str | None = None
    weights: str = "auto"
    freeze: Freeze = Freeze.all
    unfreeze: int | None = bounded(None, ge=1, hint="or null (needed with backbone.freeze=last_n)")
    stages: list[str] | None = None
    crop_size: int = bounded(224, ge=1)
    resize: int | None = bounded(None, ge=1, hint="or null; at least backbone.crop_size")
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConf:
    kind: DataKind = MISSING
    root: str | None = MISSING
    cache_dir: str = MISSING
    normalize: Normalize = Normalize.imagenet
    on_bad_image: OnBadImage = OnBadImage.error
    tile_store: AutoOff = AutoOff.auto
    tile_store_max_gb: float = bounded(20.0, ge=0)
    tile_store_device: OnOffAuto = OnOffAuto.auto
    augment: list[Augment] = field(default_factory=list)
    sampler: Sampler = Sampler.shuffle
    group: str | None = None
    group_aggregate: GroupAggregate = GroupAggregate.mean


@dataclass
class DemoDataConf(DataConf):
    kind: DataKind = DataKind.demo
    root: str | None = None
    seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    tile_size: int = bounded(250, ge=1)
    slides_per_class: list[int] = field(
        default_factory=lambda: [8, 2, 2],
        metadata={"ge": 1, "length": 3, "hint": "slides per class in train, valid and test"},
    )
    tiles_per_slide: int = bounded(10, ge=1)
    classes: int = bounded(2, ge=2, le=3, hint="3 adds stroma")


@dataclass
class LossConf:
    class_weight: Any = "none"  # none | balanced | [w1, w2, ...]: checks.class_weight


@dataclass
class TrackingConf:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "resnet-sweep"
    log_model: LogModel = LogModel.best
    log_checkpoint: bool = True
    retry_s: float = bounded(300.0, ge=0)


@dataclass
class AppConf:
    """The top-level keys of conf/train.yaml (not a registered schema: the root config is untyped so
    that ``+key=value`` notes and ``hpo_trial`` fit; checked by ``problem`` like the groups)."""

    seed: int = bounded(0, ge=0, lt=SEED_LIMIT)
    objective: str = "valid/loss"
    run_name: str = "auto"


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


TOP = ""  # the group of the top-level keys (``AppConf``): ``seed``, ``objective``, ``run_name``


def schemas_of(group: str) -> list[type]:
    """The dataclasses that type ``group`` (two for ``data``: a folder of your own and the demo)."""
    if group == TOP:
        return [AppConf]
    return [node for g, _, node in SCHEMAS if g == group]


def schema_for(group: str, node) -> type | None:
    """The dataclass that types this composed ``node`` of ``group``."""
    found = schemas_of(group)
    if group == "data":
        return DemoDataConf if str(node.get("kind")) == DataKind.demo else DataConf
    return found[0] if found else None
