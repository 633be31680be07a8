"""Groups of files (slide, patient...) by a regex on their path below the class folder: the rule
``resnet-sweep split --group`` and ``data.group`` share; a group with tiles in two classes is one line."""

from __future__ import annotations

import os
import re
from pathlib import Path

from resnet_sweep.core.errors import UserError


def group_of(name: str, pattern: re.Pattern | None) -> str | None:
    """The group key of a file (slide, patient...): the regex's first capture group (the whole match
    if it has none) searched in ``name``, the file's path below its class folder; None if it does not
    match or captures nothing. Without a regex, the file is its own group. ``resnet-sweep split
    --group`` and ``data.group`` share this rule."""
    if pattern is None:
        return name
    m = pattern.search(name)
    if m is None:
        return None
    key = m.group(1) if pattern.groups else m.group(0)
    return key or None


def group_key(path: Path, below: str, pattern: re.Pattern | None, setting: str) -> str:
    """``group_of(below, pattern)`` for the file ``path``, or one line naming the file when the regex
    misses it; ``setting`` is the regex as the user gave it (``--group '...'``, ``data.group='...'``)."""
    key = group_of(below, pattern)
    if key is None:
        raise UserError(
            f"{path}: {setting} does not match '{below}' (or captures nothing); fix the regex or move the file"
        )
    return key


def compile_group(regex: str | None, key: str = "--group") -> re.Pattern | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise UserError(f"{key} '{regex}': not a regular expression ({e})") from None


def file_groups(root: Path, files: dict[str, list[Path]], regex: str) -> dict[str, list[str]]:
    """``data.group``: the group of every file of each split (in ``files``' order). A file the regex
    does not match, or a group with tiles in two classes, is one line naming it."""
    pattern = compile_group(str(regex), "data.group")
    groups: dict[str, list[str]] = {}
    for split, paths in files.items():
        class_of: dict[str, tuple[str, Path]] = {}
        keys = []
        prefix = f"{root / split}{os.sep}"
        for path in paths:
            text = str(path)  # (by its text: pathlib's relative_to costs some 50x more, for every file)
            below = text[len(prefix) :] if text.startswith(prefix) else path.relative_to(root / split).as_posix()
            cls, _, below = below.replace(os.sep, "/").partition("/")
            key = group_key(path, below, pattern, f"data.group='{regex}'")
            seen = class_of.setdefault(key, (cls, path))
            if seen[0] != cls:
                raise UserError(
                    f"data.group='{regex}': group '{key}' of split '{split}' has tiles in two classes "
                    f"('{seen[0]}': {seen[1]}, '{cls}': {path}); a slide or patient has one class"
                )
            keys.append(key)
        groups[split] = keys
    return groups
