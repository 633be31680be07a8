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

import difflib
import functools
import re
import typing
from dataclasses import Field, dataclass, field, fields
from enum import Enum, StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

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


_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list, e.g. [a,b]",
    dict: "a mapping, e.g. {key: value}",
}
_ITEM_KINDS = {int: "a list of integers, e.g. [8,2,2]", str: "a list, e.g. [a,b]"}

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


@functools.cache
def _hints(node: type) -> dict[str, Any]:
    return typing.get_type_hints(node)


def _field(group: str, key: str) -> tuple[Field, Any] | None:
    """(the field, its type) of ``group.key`` in the first of the group's schemas that has it."""
    for node in schemas_of(group):
        for f in fields(node):
            if f.name == key:
                return f, _hints(node)[f.name]
    return None


def _parts(hint) -> tuple[type, type | None, bool]:
    """(outer type, item type of a list/dict or None, optional?) of a type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    items = typing.get_args(hint)
    return origin, (items[-1] if items else None), optional


def _or(words) -> str:
    words = [str(w) for w in words]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def expected(group: str, key: str) -> str | None:
    """What ``group.key`` must be, in words (``"an integer >= 1, or null ..."``, ``"choose auto or off"``),
    or None when no schema of the group has it."""
    found = _field(group, key)
    if found is None:
        return None
    f, hint = found
    kind, item, optional = _parts(hint)
    meta = f.metadata
    if isinstance(kind, type) and issubclass(kind, Enum):
        return f"choose {_or(kind.__members__)}" + (", or null" if optional else "")
    if kind is list and isinstance(item, type) and issubclass(item, Enum):
        return f"a list of {_or(item.__members__)}, e.g. [{','.join(item.__members__)}], or [] for none"
    if meta.get("choices"):
        return meta.get("hint") or f"choose {_or(meta['choices'])}"
    if meta.get("pattern"):
        return meta["hint"]
    words = _ITEM_KINDS.get(item, _KINDS[list]) if kind is list else _KINDS.get(kind, "of another type")
    if meta.get("length"):
        words = f"a list of {meta['length']} integers"
    bounds = [
        f"{op} {meta[name]}" for name, op in (("ge", ">="), ("le", "<="), ("lt", "<")) if meta.get(name) is not None
    ]
    if bounds:
        words += (", each " if kind is list else " ") + " and ".join(bounds)
    if meta.get("hint"):
        return f"{words} ({meta['hint']})" if kind is list else f"{words}, {meta['hint']}"
    return words + (", or null" if optional else "")


def type_error(group: str, key: str, value: Any, shown: str | None = None) -> str | None:
    """The one-line error for ``group.key=value`` when the group's schema cannot hold ``value``
    (None when it can, or when no schema knows the key: ``unknown_key`` says so).
    ``shown``: the value as the user typed it."""
    top = key.split(".")[0]
    for node in schemas_of(group):
        cfg = OmegaConf.structured(node)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except ValidationError:
            return f"{_name(group, key)}={_text(value) if shown is None else shown}: must be {expected(group, top)}"
        except (ConfigKeyError, ConfigAttributeError):
            continue
        return None
    return None


def value_error(group: str, key: str, value: Any) -> str | None:
    """The one-line error for ``group.key=value`` of the right type outside its field's range, choices
    or pattern (``trainer.crop_seed=-1``, ``trainer.device=tpu``); None when it is within them."""
    found = _field(group, key)
    if found is None or value is None or (isinstance(value, str) and "${" in value):
        return None
    meta = found[0].metadata
    items = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    bad = (
        (meta.get("choices") and str(value) not in meta["choices"])
        or (meta.get("pattern") and not re.fullmatch(meta["pattern"], str(value)))
        or (meta.get("length") is not None and len(items) != meta["length"])
        or any(_outside(item, meta) for item in items)
    )
    if not bad:
        return None
    shown = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    return f"{_name(group, key)}={_text(shown)}: must be {expected(group, key)}".replace("must be choose", "choose")


def _outside(value: Any, meta) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False  # a type error, OmegaConf's to find
    return (
        (meta.get("ge") is not None and value < meta["ge"])
        or (meta.get("le") is not None and value > meta["le"])
        or (meta.get("lt") is not None and value >= meta["lt"])
    )


def problem(group: str, key: str, value: Any, shown: str | None = None) -> str | None:
    """Type, then range, choices or pattern: the one-line error for ``group.key=value``, or None."""
    error = type_error(group, key, value, shown)
    return error.replace("must be choose", "choose") if error else value_error(group, key, value)


def unknown_key(group: str, key: str, given: str | None = None) -> str | None:
    """The one-line error for ``group.key`` when no schema of the typed ``group`` has the key
    (``trainer.max_epoch``), naming the closest known key; None for a known key or an untyped group.
    Below a mapping field (``backbone.model_kwargs.aux_logits``) any key goes."""
    nodes = schemas_of(group) if group != TOP else []
    top = key.split(".")[0]
    known = sorted({f.name for node in nodes for f in fields(node)})
    if not nodes or top in known:
        return None
    close = difflib.get_close_matches(top, known, n=1, cutoff=0.5)
    fix = f"did you mean {group}.{close[0]}?" if close else f"its keys are {', '.join(known)}"
    return f"{given or _name(group, key)}: {group} has no key '{top}'; {fix}"


def node_error(group: str, node) -> str | None:
    """The first problem of a composed group ``node`` (``cfg.trainer``...): a key its schema does not
    have (added with ``+``, or by a preset), or a value outside its range or choices."""
    schema = schema_for(group, node)
    if schema is None:
        return None
    known = {f.name for f in fields(schema)}
    for key in node if group != TOP else ():  # the root is open: +notes.x=..., hpo_trial
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
            fix = f"did you mean {group}.{close[0]}?" if close else f"its keys are {', '.join(sorted(known))}"
            kind = f" (data={node.get('kind')})" if group == "data" else ""
            return f"{_name(group, key)}: {group}{kind} has no key '{key}'; {fix}"
    for f in fields(schema):
        if f.name in node and not OmegaConf.is_missing(node, f.name):
            error = problem(group, f.name, node[f.name]) if group == TOP else value_error(group, f.name, node[f.name])
            if error:
                return error
    return None


def _name(group: str, key: str) -> str:
    return f"{group}.{key}" if group else key


def _text(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
