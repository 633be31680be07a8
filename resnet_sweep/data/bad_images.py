"""The one line for a tree's bad images: grouped by reason (too small, unreadable, zero-byte), each
with its count, a few examples and its fix; the full list written to ``data.cache_dir`` when some go
unnamed."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from resnet_sweep.core import sealed

EXAMPLES = 3  # bad files named in an error; the full list goes to a file in data.cache_dir
_SMALL = re.compile(r"image is (\d+)x(\d+), smaller than")
_UNREADABLE = re.compile(r"cannot be read as an image \((.*)\)$")


def bad_images_message(root: Path, bad: list[tuple[str, str]], crop_size: int, cache_dir=None) -> str:
    """One line for the bad images of a tree: one file is named with its reason; several are grouped
    by reason (too small, unreadable, zero-byte), each group said once with its count, a few examples
    and its fix. When files go unnamed, the full list is written to data.cache_dir and named."""
    if len(bad) == 1:
        path, why = bad[0]
        m = _SMALL.match(why)
        if m:
            side = min(int(m[1]), int(m[2]))
            return (
                f"{path}: {why}; set backbone.crop_size<={side} or backbone.resize={crop_size}, remove it, "
                "or set data.on_bad_image=skip"
            )
        return f"{path}: {why}; fix or remove it, or set data.on_bad_image=skip"

    def rel(path: str) -> str:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            return path

    small, unreadable, empty, other = [], [], [], []
    for path, why in bad:
        if m := _SMALL.match(why):
            small.append((path, f"{rel(path)} {m[1]}x{m[2]}", min(int(m[1]), int(m[2]))))
        elif m := _UNREADABLE.match(why):
            text = m[1].replace(f" '{path}'", "").replace(f" {path}", "")  # PIL repeats the full path
            unreadable.append((path, f"{rel(path)} ({text})"))
        elif why == "zero-byte file":
            empty.append((path, rel(path)))
        else:
            other.append((path, f"{rel(path)} ({why})"))

    def examples(group) -> str:
        shown = ", ".join(g[1] for g in group[:EXAMPLES])
        return f"e.g. {shown}, ..." if len(group) > EXAMPLES else shown

    def them(group) -> str:
        return "it" if len(group) == 1 else "them"

    def plural(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    # (what, fix) per reason, most files first
    groups = []
    if small:
        fix = f"set backbone.crop_size<={min(g[2] for g in small)} or backbone.resize={crop_size}"
        groups.append(
            (
                len(small),
                f"{plural(len(small), 'image is', 'images are')} smaller than the "
                f"{crop_size}x{crop_size} crop ({examples(small)})",
                fix,
            )
        )
    if unreadable:
        groups.append(
            (
                len(unreadable),
                f"{plural(len(unreadable), 'file', 'files')} cannot be read as "
                f"{'an image' if len(unreadable) == 1 else 'images'} "
                f"({examples(unreadable)})",
                f"fix or remove {them(unreadable)}",
            )
        )
    if empty:
        groups.append(
            (
                len(empty),
                f"{plural(len(empty), 'file is', 'files are')} empty (zero bytes: {examples(empty)})",
                f"remove {them(empty)}",
            )
        )
    if other:
        groups.append(
            (
                len(other),
                f"{plural(len(other), 'file', 'files')} cannot be used ({examples(other)})",
                f"fix or remove {them(other)}",
            )
        )
    groups.sort(key=lambda g: -g[0])
    where = f"data.root={root}"
    if len(groups) == 1:
        _, what, fix = groups[0]
        message = f"{where}: {what}; {fix}, or set data.on_bad_image=skip"
    else:
        message = (
            f"{where}: {len(bad)} bad images: "
            + "; ".join(f"{what}: {fix}" for _, what, fix in groups)
            + "; or set data.on_bad_image=skip to leave them all out"
        )
    unnamed = any(len(g) > EXAMPLES for g in (small, unreadable, empty, other))
    listed = bad_images_file(root, bad, cache_dir) if unnamed else None
    return f"{message} (all {len(bad)} listed in {listed})" if listed else message


def bad_images_file(root: Path, bad: list[tuple[str, str]], cache_dir) -> Path | None:
    """Every bad image of the tree, one ``path<TAB>reason`` a line, in
    ``cache_dir/bad-images/<root>.tsv`` (None without a cache folder or when it cannot be written)."""
    if cache_dir is None:
        return None
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    path = Path(os.path.expanduser(str(cache_dir))) / "bad-images" / f"{Path(root).resolve().name}-{key}.tsv"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sealed.write_text(path, "".join(f"{p}\t{why}\n" for p, why in bad))
    except OSError:
        return None
    return path
