"""Group-aware train/valid/test split: ``SRC/<class>/*`` -> ``DST/{train,valid,test}/<class>/*``.

Tiles of one slide (patient, animal...) look alike, so a slide in two splits leaks: the group of a
file -- the first capture group of ``--group REGEX`` searched in the file's path below its class
folder -- goes whole into one split. The group key is the captured string across classes: a slide
with tiles of both classes also stays in one split.

Assignment (``assign``, a pure function of the (file, class, group) list, the ratios and the seed):
groups are taken largest first (equal sizes in a seeded random order) and each goes to the split
whose per-class image counts are furthest below their targets ``ratio x class total``, weighted by
the group's class mix (ties broken by the seed). So that every split holds every class, once a
class has only as many groups left as there are splits still without it, each of those groups goes
to a split without it; where that is not the split the rule above would pick, the placement is
"forced" (reported).

Guarantee, for groups that hold one class (slides of one diagnosis), every split s with ratio r_s
and every class c with N_c images in groups of at most g_c images each:

- ``|n_sc - r_s * N_c| <= g_c`` when no placement of class c was forced (within one group's size);
- ``|n_sc - r_s * N_c| <= 2 * g_c`` when one was (a split got one group bigger than its target
  because otherwise it would have none of the class);
- every split with a ratio > 0 holds at least one group of every class (a class with fewer
  groups than such splits is an error), every file is in exactly one split, no group in two.

Why: a split gets a group by the rule only while its shortfall for the class is the largest, so
above 0: it ends less than one group over its target. A split ending g_c or more short would mean
every other split's last group left it short too (it had the largest shortfall then), so the
shortfalls could not sum to 0 -- unless those last groups were forced, each of which adds less than
one group of excess.

Groups that hold several classes keep the last two points (or an error if the splits cannot all
get every class); the closeness to the ratios is then best effort.
"""

from __future__ import annotations

import csv
import math
import os
import random
import secrets
import shutil
import stat
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from resnet_sweep.config.checks import SPLITS
from resnet_sweep.core.errors import UserError
from resnet_sweep.data.grouping import compile_group, group_key


class Item(NamedTuple):
    file: str  # path below SRC, e.g. "class_a/slide01_tile003.png"
    cls: str
    group: str


@dataclass
class Assignment:
    split_of_group: dict[str, str]
    # (class, group, split): groups placed only so that the split holds that class
    forced: list[tuple[str, str, str]] = field(default_factory=list)

    def split_of(self, item: Item) -> str:
        return self.split_of_group[item.group]


def parse_ratios(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> three numbers >= 0 summing to 1 (within 0.001), normalised."""
    where = f"--ratios {text}"
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{where}: give three numbers for train,valid,test, e.g. 0.7,0.15,0.15") from None
    if len(values) != 3:
        raise UserError(f"{where}: {len(values)} number(s); give three for train,valid,test, e.g. 0.7,0.15,0.15")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"{where}: every ratio must be a number >= 0")
    total = sum(values)
    if abs(total - 1) > 1e-3:
        raise UserError(f"{where}: the ratios sum to {total:g}; they must sum to 1")
    return tuple(v / total for v in values)


def scan(src: Path, regex: str | None) -> list[Item]:
    """The (file, class, group) list of ``SRC/<class>/**``. Hidden files and folders are ignored.
    The regex is searched in the path below the class folder (the file name, in a flat folder)."""
    if not src.is_dir():
        raise UserError(f"{src}: no such directory; give a folder holding one folder per class")
    pattern = compile_group(regex)
    entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
    classes = [p for p in entries if p.is_dir()]
    if not classes:
        raise UserError(f"{src}: no class folders; expected {src}/<class>/<images>")
    if {p.name for p in classes} & set(SPLITS):
        raise UserError(
            f"{src}: holds {', '.join(sorted({p.name for p in classes} & set(SPLITS)))}/, so it looks "
            f"split already; give the folder with one folder per class"
        )
    loose = [p for p in entries if p.is_file()]
    if loose:
        raise UserError(
            f"{src}: {len(loose)} file(s) outside class folders (e.g. {loose[0].name}); move them into "
            "a class folder or remove them"
        )
    items = []
    for folder in classes:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        if not files:
            raise UserError(f"{folder}: no images; add images or remove the folder")
        for path in files:
            below = path.relative_to(folder).as_posix()
            key = group_key(path, below, pattern, f"--group '{regex}'")
            items.append(Item(path.relative_to(src).as_posix(), folder.name, key))
    return items


def assign(items: Sequence[Item], ratios: Sequence[float], seed: int = 0, splits: Sequence[str] = SPLITS) -> Assignment:
    """Which split each group goes to (see the module docstring for the rule and the guarantee).
    Deterministic for a given item list, ratios and seed."""
    total = sum(ratios)
    ratios = [r / total for r in ratios]
    rng = random.Random(seed)
    size_of: dict[str, Counter] = defaultdict(Counter)  # group -> class -> images
    for it in items:
        size_of[it.group][it.cls] += 1
    class_total = Counter(it.cls for it in items)
    classes = sorted(class_total)
    open_splits = [s for s, r in zip(splits, ratios) if r > 0]
    groups_of_class = {c: sorted(g for g in size_of if size_of[g][c]) for c in classes}
    short = {c: len(gs) for c, gs in groups_of_class.items() if len(gs) < len(open_splits)}
    if short:
        said = "; ".join(
            f"class '{c}' has {n} group{'' if n == 1 else 's'} ({', '.join(groups_of_class[c][:5])})"
            for c, n in short.items()
        )
        raise UserError(
            f"{said}: each of {', '.join(open_splits)} needs at least one group of every class; "
            "add groups, check --group, or give a split ratio 0"
        )

    target = {s: {c: r * class_total[c] for c in classes} for s, r in zip(splits, ratios)}
    count = {s: Counter() for s in splits}
    remaining = Counter({c: len(gs) for c, gs in groups_of_class.items()})  # groups not yet placed
    lacking = {c: set(open_splits) for c in classes}  # open splits without c

    order = sorted(size_of)
    rng.shuffle(order)
    order.sort(key=lambda g: -sum(size_of[g].values()))  # largest first; equal sizes in seeded order
    result = Assignment({})
    for g in order:
        mix = size_of[g]
        critical = [c for c in mix if remaining[c] == len(lacking[c]) and lacking[c]]
        candidates = [s for s in open_splits if all(s in lacking[c] for c in critical)]
        if not candidates:  # only possible for groups holding several classes
            candidates = [s for s in open_splits if any(s in lacking[c] for c in critical)]

        def score(s, mix=mix):
            return sum(n * (target[s][c] - count[s][c]) / class_total[c] for c, n in mix.items())

        best = max(candidates, key=lambda s: (score(s), rng.random()))
        result.split_of_group[g] = best
        if score(best) < max(score(s) for s in open_splits):  # the class constraint changed the choice
            result.forced += [(c, g, best) for c in critical if best in lacking[c]]
        for c, n in mix.items():
            count[best][c] += n
            remaining[c] -= 1
            lacking[c].discard(best)
    missing = {c: sorted(s) for c, s in lacking.items() if s}
    if missing:
        raise UserError(
            "could not give every split a group of every class (groups holding several classes): "
            + "; ".join(f"'{c}' missing from {', '.join(s)}" for c, s in missing.items())
        )
    return result


def counts(items: Sequence[Item], assignment: Assignment) -> dict[str, Counter]:
    """split -> class -> number of images."""
    out: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        out[assignment.split_of(it)][it.cls] += 1
    return out


def table(
    items: Sequence[Item], assignment: Assignment, ratios: Sequence[float], splits: Sequence[str] = SPLITS
) -> str:
    """Markdown: per split, its ratio, groups, images (% of all), per class the images (% of the class,
    target ratio x class total), and the split's class balance (% of its images per class)."""
    n = counts(items, assignment)
    class_total = Counter(it.cls for it in items)
    classes = sorted(class_total)
    groups = Counter(assignment.split_of_group.values())
    header = ["split", "ratio", "groups", "images"] + classes + ["class balance"]
    rows = []
    for s, r in zip(splits, ratios):
        images = sum(n[s].values())
        cells = [s, f"{r:.2f}", str(groups[s]), f"{images} ({_pct(images, len(items))})"]
        cells += [f"{n[s][c]} ({_pct(n[s][c], class_total[c])}, target {r * class_total[c]:.1f})" for c in classes]
        cells.append(" / ".join(_pct(n[s][c], images) for c in classes) if images else "-")
        rows.append(cells)
    rows.append(
        ["all", "1.00", str(len(assignment.split_of_group)), str(len(items))]
        + [str(class_total[c]) for c in classes]
        + [" / ".join(_pct(class_total[c], len(items)) for c in classes)]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def write(
    items: Sequence[Item], assignment: Assignment, src: Path, dst: Path, copy: bool = False, force: bool = False
) -> None:
    """Link (absolute symlinks) or copy every file to ``DST/<split>/<file>`` and write
    ``DST/split.csv`` (file, class, group, split). Built beside DST and moved into place, so DST is
    either the old split or the new one. DST must be empty or absent; ``force`` replaces an earlier
    split made by this command (one holding split.csv) and nothing else. Folders and files get the
    ordinary modes, as mkdir and cp give them (the umask applies; a setgid parent's group is kept);
    a DST that existed empty keeps its own mode and group."""
    src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
    if dst == src or src in dst.parents or dst in src.parents:
        raise UserError(f"{dst}: DST must be outside SRC ({src}) and not contain it")
    old = empty = None
    if dst.exists():
        if not dst.is_dir():
            raise UserError(f"{dst}: exists and is not a folder; choose a new DST")
        if any(dst.iterdir()):
            if not force:
                raise UserError(
                    f"{dst}: not empty; choose a new DST, or add --force to replace an earlier split "
                    "made by `resnet-sweep split`"
                )
            if not (dst / "split.csv").is_file():
                raise UserError(
                    f"{dst}: not empty and holds no split.csv, so it is not a split made by "
                    "`resnet-sweep split`; --force replaces only those; choose a new DST"
                )
            old = dst
        else:
            empty = dst.stat()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0700 would make DST private; mkdir's mode follows the umask
    umask = current_umask()
    try:
        if empty is not None:  # the user's own empty DST (perhaps group-shared): keep its mode and group
            try:
                os.chown(tmp, -1, empty.st_gid)
            except OSError:
                pass
            os.chmod(tmp, stat.S_IMODE(empty.st_mode))
        for s in SPLITS:
            (tmp / s).mkdir()
        for it in items:
            out = tmp / assignment.split_of(it) / it.file
            out.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copy2(src / it.file, out)
                os.chmod(out, stat.S_IMODE(os.stat(out).st_mode) & ~umask)  # cp's mode: the source's, less the umask
            else:
                out.symlink_to(src / it.file)
        with open(tmp / "split.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "class", "group", "split"])
            for it in sorted(items, key=lambda it: (assignment.split_of(it), it.file)):
                w.writerow([it.file, it.cls, it.group, assignment.split_of(it)])
        if old is not None:
            trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, trash / "old")
            os.replace(tmp, dst)
            shutil.rmtree(trash)
        else:
            if dst.exists():
                dst.rmdir()
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    """The process's umask: from /proc on Linux, else by setting it and putting it back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
