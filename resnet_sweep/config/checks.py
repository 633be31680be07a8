"""Config mistakes, found before anything heavy is imported or created: one line naming the key and
what to do. Imports no torch, no MLflow: root ``train.py`` checks its overrides with this before Hydra
composes, and every job and sweep point is checked with it before it starts (``preflight``)."""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from resnet_sweep.config import schema, schema_errors
from resnet_sweep.config.objective import direction
from resnet_sweep.core.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

SPLITS = ("train", "valid", "test")  # the folders of an ImageFolder root, in this order
AUGMENTS = tuple(schema.Augment)
SAMPLERS = tuple(schema.Sampler)  # data.sampler (crops.epoch_order)
GROUP_AGGREGATES = tuple(schema.GroupAggregate)  # data.group_aggregate
PRECISIONS = {"auto": None, "bf16": True, "bf16-mixed": True, "32": False, "fp32": False}  # choice -> bf16?
WEIGHTS = ("auto", "imagenet", "none")  # backbone.weights, or a path to a state dict
TYPED = ("trainer", "backbone", "data", "tracking", "loss")  # the groups with a schema
# crops per backbone forward while extracting, unless trainer.bank_batch_size says otherwise: on a
# GPU a ResNet18 forward of 64 crops is over before Python has launched the next (an H200 ran plain
# bf16 inference at 27,800 img/s with batches of 64, 37,100 with 256)
EXTRACT_BATCH = {"cpu": 64, "cuda": 256}


def check_config(cfg) -> None:
    """Every config value that would otherwise fail late, with a traceback, or silently: one line
    naming the key. Cheap (no data is read, nothing is created). Each typed group's keys, types,
    choices and ranges as its schema declares them (``schema_errors.node_error``), the top-level keys, then
    what one key needs of another. What needs torch, the machine or the data is ``preflight``'s."""
    check_optimizer_values(cfg.optimizer)
    for group in (schema.TOP, *TYPED):
        error = schema_errors.node_error(group, cfg if group == schema.TOP else cfg[group])
        if error:
            raise UserError(error)
    direction(str(cfg.objective))
    if str(cfg.objective).startswith("valid/slide/") and cfg.data.group is None:
        raise UserError(
            f"objective={cfg.objective}: slide-level metrics need data.group=REGEX (the group of each file, "
            "as resnet-sweep split --group)"
        )
    check_backbone(cfg.backbone)
    check_data(cfg.data)
    class_weight(cfg.loss)


def check_backbone(backbone_cfg) -> None:
    """``weights``: a choice or a file; what one backbone key needs of another: ``resize`` at least
    ``crop_size``; ``freeze=last_n`` with ``unfreeze``, ``freeze=stages`` with ``stages`` (the names
    themselves need the model: ``models``)."""
    weights = str(backbone_cfg.weights)
    if weights not in WEIGHTS and not Path(os.path.expanduser(weights)).is_file():
        raise UserError(f"backbone.weights={weights}: no such file; use auto, imagenet, none or a path to a state dict")
    resize, crop = backbone_cfg.resize, backbone_cfg.crop_size
    if resize is not None and resize < crop:
        raise UserError(f"backbone.resize={resize}: must be null or an integer >= backbone.crop_size ({crop})")
    if backbone_cfg.freeze == schema.Freeze.last_n and backbone_cfg.unfreeze is None:
        raise UserError(
            "backbone.unfreeze=null: with backbone.freeze=last_n, give the number of parameterised layers to "
            "train, counted from the output, e.g. backbone.unfreeze=2"
        )
    stages = backbone_cfg.stages
    if backbone_cfg.freeze == schema.Freeze.stages and not stages:
        raise UserError(
            "backbone.stages: with backbone.freeze=stages, give a list of submodule names, e.g. backbone.stages=[layer4]"
        )


def check_optimizer_values(optimizer_cfg) -> None:
    """The optimizer's arguments are numbers (or lists of numbers, like ``betas``): a word where a
    number belongs (``optimizer.momentum=abc``) is named here, before torch is even imported."""
    lr = optimizer_cfg.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"optimizer.lr={lr}: the learning rate must be a number > 0")
    for key, value in optimizer_cfg.items():
        if key.startswith("_"):
            continue
        values = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, str) for v in values):
            raise UserError(f"optimizer.{key}={value}: must be a number; check the optimizer.* values")


def precision(choice) -> bool | None:
    """``trainer.precision``: True for bf16, False for fp32, None for auto (the hardware decides)."""
    choice = str(choice)
    if choice not in PRECISIONS:
        raise UserError(f"trainer.precision={choice}: choose auto, bf16 or 32")
    return PRECISIONS[choice]


def feature_bank(trainer_cfg) -> str:
    choice = str(trainer_cfg.feature_bank)
    if choice not in ("auto", "off"):
        raise UserError(f"trainer.feature_bank={choice}: choose auto or off")
    return choice


def batch_heads(trainer_cfg) -> str:
    """``trainer.batch_heads``: auto (the heads of a sweep's compatible jobs train together) or off."""
    choice = str(trainer_cfg.batch_heads)
    if choice not in ("auto", "off"):
        raise UserError(f"trainer.batch_heads={choice}: choose auto or off")
    return choice


def log_model(tracking_cfg) -> str:
    """``tracking.log_model``: every run (all), only the sweep's best (best), or none."""
    return str(tracking_cfg.log_model)


def check_data(data_cfg) -> None:
    """The data keys, without reading the data: a user's root must exist; the demo takes no root; a
    ``data.group`` is a regular expression (whether it matches the files is ``preflight``'s)."""
    check_root(data_cfg)
    if data_cfg.group is not None:
        try:
            re.compile(str(data_cfg.group))
        except re.error as e:
            raise UserError(
                f"data.group='{data_cfg.group}': not a regular expression ({e}); e.g. data.group='slide([^_]+)_'"
            ) from None


def check_sampler(sampler) -> str:
    if str(sampler) not in SAMPLERS:
        raise UserError(
            f"data.sampler={sampler}: choose shuffle (every tile once per epoch) or balanced "
            "(every class equally likely at each draw)"
        )
    return str(sampler)


def class_weight(loss_cfg) -> str | list[float]:
    """``loss.class_weight``: none, balanced, or a list of positive numbers (one per class folder;
    its length is checked against the data's classes when they are known: ``metrics.class_weights``)."""
    value = loss_cfg["class_weight"]
    if value is None or str(value) in ("none", "balanced"):
        return "none" if value is None else str(value)
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        weights = list(value)
        if weights and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights):
            return [float(w) for w in weights]
    shown = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    raise UserError(
        f"loss.class_weight={shown}: choose none, balanced (from the training split's class counts) "
        "or one positive weight per class folder, e.g. loss.class_weight=[1,9]"
    )


def check_root(data_cfg) -> Path | None:
    """The root keys, without generating or reading anything: the demo takes no ``data.root``; a
    user's folder must be given and exist. Returns that folder (None for the demo)."""
    if data_cfg.kind == "demo":
        if data_cfg.root is not None:
            raise UserError(
                f"data.root={data_cfg.root} is set, but data=demo trains on the embedded demo data; "
                "add data=imagefolder to train on your folder"
            )
        return None
    if OmegaConf.is_missing(data_cfg, "root") or data_cfg.get("root") is None:
        raise UserError(
            "data=imagefolder needs data.root: add data.root=/path/to/tiles (a folder holding "
            "train/, valid/ and test/, each with one folder per class)"
        )
    root = Path(os.path.expanduser(str(data_cfg.root)))
    if not root.is_dir():
        raise UserError(
            f"data.root={data_cfg.root}: no such directory; point it at a folder holding "
            "train/, valid/ and test/, each with one folder per class"
        )
    return root


def check_augment(augment) -> tuple:
    augment = tuple(str(a) for a in (augment or ()))
    unknown = [a for a in augment if a not in AUGMENTS]
    if unknown:
        raise UserError(
            f"data.augment={list(augment)}: unknown {unknown[0]}; choose from {', '.join(AUGMENTS)} "
            "(e.g. data.augment=[hflip,vflip,rot90]), or [] for none"
        )
    return augment


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def check_overrides(argv: list[str] | None = None) -> None:
    """The command line's overrides, before Hydra composes anything: an unknown config-group choice
    (``backbone=resnet99``) as one line listing the choices, a key no schema of a typed group has
    (``+trainer.max_epoch=3``, ``+`` or not) naming the closest one, a value of the wrong type, range
    or choice for its schema (``trainer.batch_size=abc``, ``trainer.crop_seed=-1``, every value of a
    sweep) as one line saying what it must be; exit 2."""
    problem = override_error([a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")])
    if problem:
        print(problem, file=sys.stderr, flush=True)
        sys.exit(2)


def override_error(args: list[str]) -> str | None:
    """The first problem of these overrides (``check_overrides``), as one line (one that Hydra cannot
    parse too, ``data.group=slide([``); None when there is none. Also run on every sweep point's overrides
    (``preflight.check_sweep``: a preset's ``hydra.sweeper.params`` are not on the command line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    overrides = []
    for arg in args:
        if "=" not in arg and not arg.startswith("~"):
            continue  # an option's value (--cfg job, -cn train), not an override
        try:
            overrides.append(parser.parse_override(arg))
        except HydraException as e:
            why = str(e).splitlines()[0]
            return f"{arg}: not an override Hydra can read ({why}); quote a value with special characters: key='value'"
    for o in overrides:
        key = o.key_or_group.lstrip("+~")
        group, _, rest = key.partition(".")
        if o.is_delete() and rest and schema.schemas_of(group):
            return f"{o.input_line}: the keys of {group} cannot be removed; set {key}=... instead"
        if o.package or o.is_delete() or key.startswith("hydra/") or key.startswith("hydra."):
            continue  # plugins add options (hydra/launcher=joblib): Hydra checks these
        if o.value_type == ValueType.ELEMENT:
            values = [o.value()]
        elif o.value_type in (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP):
            values = list(o.value().list)
        else:
            values = []  # range(...), interval(...): every point is checked once composed (preflight)
        if (CONF_DIR / key).is_dir():
            problem = group_choice_error(key, values)
        elif not (o.is_add() or o.is_force_add()) and (problem := untyped_key_error(key)):
            pass
        elif key.startswith("optimizer."):
            problem = optimizer_value_error(key.partition(".")[2], values)
        else:
            problem = value_error(key, values, o.input_line)
        if problem:
            return problem
    return None


UNTYPED = ("head", "optimizer", "scheduler")  # groups without a schema: their YAML files say their keys


@functools.cache
def yaml_keys(group: str) -> tuple[str, ...]:
    """The keys any YAML file of ``group`` has (``""``: conf/train.yaml's own, and the group names)."""
    if group == "":
        own = OmegaConf.load(CONF_DIR / "train.yaml")
        return tuple(sorted({*own.keys(), *(p.name for p in CONF_DIR.iterdir() if p.is_dir())} - {"defaults"}))
    return tuple(sorted({k for path in (CONF_DIR / group).rglob("*.yaml") for k in OmegaConf.load(path)}))


def untyped_key_error(key: str) -> str | None:
    """``head.dropuot=0.1`` or ``seeds=3`` without ``+``: a key no YAML of its group (or train.yaml)
    has, which Hydra would refuse in several lines; one line naming the closest key instead."""
    group, _, rest = key.partition(".")
    if rest and group not in UNTYPED:
        return None  # the typed groups: schema_errors.unknown_key
    group, rest = (group, rest) if rest else ("", key)
    top = rest.split(".")[0]
    known = yaml_keys(group)
    if top in known:
        return None
    close = difflib.get_close_matches(top, known, n=1, cutoff=0.5)
    where = f"no {group} config has key '{top}'" if group else f"no top-level key '{top}'"
    fix = f"did you mean {(group + '.') if group else ''}{close[0]}?" if close else f"the keys are {', '.join(known)}"
    return f"{key}: {where}; {fix} (+{key}=... adds a new key)"


def group_choice_error(group: str, values: list) -> str | None:
    options = group_options(group)
    unknown = [str(v) for v in values if v is not None and str(v) not in options]
    return f"{group}={unknown[0]}: unknown {group}; choose one of {', '.join(options)}" if unknown else None


def optimizer_value_error(key: str, values: list) -> str | None:
    """``optimizer.<key>=value`` that ``check_optimizer_values`` would refuse once composed."""
    for value in values:
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: checked once composed
        try:
            check_optimizer_values({"lr": value} if key == "lr" else {"lr": 1.0, key: value})
        except UserError as e:
            return str(e)
    return None


def value_error(key: str, values: list, given: str = "") -> str | None:
    """``group.key=value`` where the group's schema has no such key, or cannot hold the value (type,
    range, choice); ``seed=value`` and the other top-level keys likewise. ``given``: the override as typed."""
    group, _, rest = key.partition(".")
    if not rest:
        group, rest = schema.TOP, key
    unknown = schema_errors.unknown_key(group, rest, given.partition("=")[0] or key)
    if unknown:
        return unknown
    for value in values:
        problem = schema_errors.problem(group, rest, value)
        if problem:
            return problem
    return None
