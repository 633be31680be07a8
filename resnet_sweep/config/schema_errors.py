"""The one-line error for a config value that its schema field refuses (``resnet_sweep.config.schema``): a
key the group does not have, a value of the wrong type, outside the field's choices (an Enum, or
``one_of``) or its range (``bounded``). Used on the command line before Hydra composes
(``checks.check_overrides``) and on every composed job and sweep point (``checks.check_config``).
Imports no torch, no MLflow."""

from __future__ import annotations

import difflib
import functools
import re
import typing
from dataclasses import Field, fields
from enum import Enum
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from resnet_sweep.config.schema import TOP, schema_for, schemas_of

_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list, e.g. [a,b]",
    dict: "a mapping, e.g. {key: value}",
}
_ITEM_KINDS = {int: "a list of integers, e.g. [8,2,2]", str: "a list, e.g. [a,b]"}


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
