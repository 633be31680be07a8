"""Config mistakes, found before anything heavy is imported or created: one line naming the key and
what to do. Imports no torch, no MLflow: root ``train.py`` checks its overrides with this before Hydra
composes, and every job and sweep point is checked with it before it starts (``preflight``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .errors import UserError
from .objective import direction

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

SPLITS = ("train", "valid", "test")  # the folders of an ImageFolder root, in this order
AUGMENTS = ("hflip", "vflip", "rot90")
SAMPLERS = ("shuffle", "balanced")  # data.sampler (crops.epoch_order)
GROUP_AGGREGATES = ("mean", "majority")  # data.group_aggregate
PRECISIONS = {"auto": None, "bf16": True, "bf16-mixed": True, "32": False, "fp32": False}  # choice -> bf16?
LOG_MODEL = ("all", "best", "none")
# crops per backbone forward while extracting, unless trainer.bank_batch_size says otherwise: on a
# GPU a ResNet18 forward of 64 crops is over before Python has launched the next (an H200 ran plain
# bf16 inference at 27,800 img/s with batches of 64, 37,100 with 256)
EXTRACT_BATCH = {"cpu": 64, "cuda": 256}


def check_config(cfg) -> None:
    """Every config value that would otherwise fail late, with a traceback, or silently: one line
    naming the key. Cheap (no data is read, nothing is created). The optimizer's own dry run, which
    needs torch, is ``engine.check_optimizer``; ``preflight.check_job`` runs both."""
    check_optimizer_values(cfg.optimizer)
    for key in ("max_epochs", "batch_size", "num_workers", "bank_views"):
        value = cfg.trainer.get(key)
        low = 0 if key == "num_workers" else 1
        if not is_int(value) or value < low:
            raise UserError(f"trainer.{key}={value}: must be an integer >= {low}")
    patience = cfg.trainer.patience
    if patience is not None and (not is_int(patience) or patience < 1):
        raise UserError(f"trainer.patience={patience}: must be an integer >= 1, or null to never stop early")
    bank_batch = cfg.trainer.get("bank_batch_size")
    if bank_batch is not None and (not is_int(bank_batch) or bank_batch < 1):
        raise UserError(
            f"trainer.bank_batch_size={bank_batch}: must be an integer >= 1, or null for "
            f"{EXTRACT_BATCH['cpu']} on a CPU, {EXTRACT_BATCH['cuda']} on a GPU"
        )
    if not is_int(cfg.seed):
        raise UserError(f"seed={cfg.seed}: must be an integer")
    direction(str(cfg.objective))
    if str(cfg.objective).startswith("valid/slide/") and not cfg.data.get("group"):
        raise UserError(
            f"objective={cfg.objective}: slide-level metrics need data.group=REGEX (the group of each file, "
            "as resnet-sweep split --group)"
        )
    precision(cfg.trainer.precision)
    feature_bank(cfg.trainer)
    batch_heads(cfg.trainer)
    log_model(cfg.tracking)
    check_data(cfg.data)
    class_weight(cfg.get("loss"))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    choice = str(trainer_cfg.get("feature_bank", "auto"))
    if choice not in ("auto", "off"):
        raise UserError(f"trainer.feature_bank={choice}: choose auto or off")
    return choice


def batch_heads(trainer_cfg) -> str:
    """``trainer.batch_heads``: auto (the heads of a sweep's compatible jobs train together) or off."""
    choice = str(trainer_cfg.get("batch_heads", "auto"))
    if choice not in ("auto", "off"):
        raise UserError(f"trainer.batch_heads={choice}: choose auto or off")
    return choice


def log_model(tracking_cfg) -> str:
    """``tracking.log_model``: every run (all), only the sweep's best (best), or none."""
    choice = str(tracking_cfg.log_model)
    if choice not in LOG_MODEL:
        raise UserError(f"tracking.log_model={choice}: choose all, best or none")
    return choice


def check_data(data_cfg) -> None:
    """The data keys, without reading the data: a user's root must exist; the demo takes no root."""
    check_root(data_cfg)
    if str(data_cfg.get("on_bad_image", "error")) not in ("error", "skip"):
        raise UserError(f"data.on_bad_image={data_cfg.on_bad_image}: choose error or skip")
    if str(data_cfg.get("normalize")) not in ("imagenet", "dataset"):
        raise UserError(f"data.normalize={data_cfg.get('normalize')}: choose imagenet or dataset")
    check_augment(data_cfg.get("augment"))
    check_sampler(data_cfg.get("sampler", "shuffle"))
    if str(data_cfg.get("group_aggregate", "mean")) not in GROUP_AGGREGATES:
        raise UserError(
            f"data.group_aggregate={data_cfg.get('group_aggregate')}: choose mean (mean tile probability) "
            "or majority (share of tile votes)"
        )


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
    value = "none" if loss_cfg is None else loss_cfg.get("class_weight", "none")
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
        if data_cfg.get("root") is not None:
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
    (``backbone=resnet99``) as one line listing the choices, a value of the wrong type for its
    schema (``trainer.batch_size=abc``) as one line saying what it must be; exit 2."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:
        return  # Hydra reports syntax errors itself
    for o in overrides:
        key = o.key_or_group.lstrip("+~")
        if o.package or o.is_delete() or key.startswith("hydra/") or key.startswith("hydra."):
            continue  # plugins add options (hydra/launcher=joblib): Hydra checks these
        if o.value_type == ValueType.ELEMENT:
            values = [o.value()]
        elif o.value_type in (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP):
            values = list(o.value().list)
        else:
            continue
        if (CONF_DIR / key).is_dir():
            problem = group_choice_error(key, values)
        elif key.startswith("optimizer."):
            problem = optimizer_value_error(key.partition(".")[2], values)
        else:
            problem = value_type_error(key, values)
        if problem:
            print(problem, file=sys.stderr, flush=True)
            sys.exit(2)


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


def value_type_error(key: str, values: list) -> str | None:
    """``group.key=value`` where the group's typed schema cannot hold the value."""
    from . import schema

    group, _, rest = key.partition(".")
    if not rest:
        return None
    for value in values:
        problem = schema.type_error(group, rest, value)
        if problem:
            return problem
    return None
