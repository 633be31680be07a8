"""What a sweep's jobs share of their data: the tree listed, stamped and every file checked once
per sweep (``CheckedTree``), by its pre-flight or first job, in ``<sweep dir>/.sweep-data``."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from resnet_sweep.config.checks import SPLITS
from resnet_sweep.core import sealed
from resnet_sweep.core.registry import PROCESS
from resnet_sweep.data.image_folder import Listing, list_tree
from resnet_sweep.data.images import image_checks, usable

# ---------------------------------------------------------------- what a sweep's jobs share
# What depends only on the data (the tree's listing, every file's stamp and check) is made once per
# sweep: by its pre-flight (``start_sweep_share``, then ``checked_tree`` for the first point), else by
# the first job that needs it, and written to ``<sweep dir>/.sweep-data/<root key>.json``; the other
# jobs read that record (once per process: then remembered while the file is unchanged). A new sweep
# starts with an empty folder, so it lists and stamps the data afresh: a file added or changed
# between two sweeps is seen. Within a sweep, the data is as it was when the sweep first listed it.

SHARE_FOLDER = ".sweep-data"
# the share folder of the sweep this process started; record path -> (the record's stat, its tree)
_share: dict[str, str | None] = PROCESS.state("loading.share", {"folder": None})
_trees: dict[str, tuple[tuple, CheckedTree]] = PROCESS.state("loading.trees")


@dataclass
class CheckedTree:
    """A tree as listed (``image_folder.Listing``) and every listed file's check (``images.image_checks``)."""

    listing: Listing
    checks: dict[str, list | str]
    _usable: dict = field(default_factory=dict, repr=False)
    _samples: dict = field(default_factory=dict, repr=False)

    def samples(self, files: dict, labels: dict, split: str) -> list[tuple[Path, int]]:
        """(file, label) of ``split`` in loader order, read-only: made once and shared by the sweep's
        jobs when the split is the listed one whole (20,000 new tuples a job otherwise: the garbage
        collector's scans of a job's large heap made that some 0.1 s a split)."""
        if files[split] is not self.listing.files[split]:
            return list(zip(files[split], labels[split]))
        if split not in self._samples:
            self._samples[split] = list(zip(files[split], labels[split]))
        return self._samples[split]

    def usable(self, crop_size: int, on_bad_image: str, cache_dir) -> tuple[dict, dict, list]:
        """``images.usable`` of the tree at ``crop_size``; when no file is bad, remembered for the
        sweep's other jobs (a bad file's warning or error line is each job's own)."""
        if (crop_size, on_bad_image) in self._usable:
            return self._usable[crop_size, on_bad_image]
        found = usable(self.listing, self.checks, crop_size, on_bad_image, cache_dir)
        if not found[2]:
            self._usable[crop_size, on_bad_image] = found
        return found


def start_sweep_share(sweep_dir: Path) -> Path:
    """The folder in which the jobs of the sweep in ``sweep_dir`` share what depends only on the data,
    emptied: called once by the sweep's pre-flight, before any job."""
    folder = Path(sweep_dir).absolute() / SHARE_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _share["folder"] = str(folder)
    _trees.clear()
    return folder


def sweep_share(hc) -> Path | None:
    """The share folder of the sweep of Hydra config ``hc`` (``hydra.*``: a multirun job whose sweep's
    pre-flight made one), else None (``hc`` None: outside Hydra). Outside a job, Hydra's config may be
    an earlier sweep's: a process that started a sweep only trusts that sweep's folder."""
    from hydra.types import RunMode

    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    folder = (Path(str(hc.runtime.cwd)) / str(hc.sweep.dir)).absolute() / SHARE_FOLDER
    if _share["folder"] is not None and _share["folder"] != str(folder):
        return None
    return folder if folder.is_dir() else None


def record_of(share: Path, root: Path) -> Path:
    return share / f"{hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:16]}.json"


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def remembered(record: Path) -> CheckedTree | None:
    """The tree in ``record``: remembered from an earlier job of this process while the file is
    unchanged, else read (None when there is none, or it is unreadable)."""
    stat = _stat(record)
    if stat is None:
        return None
    known = _trees.get(str(record))
    if known is not None and known[0] == stat:
        return known[1]
    try:
        raw = json.loads(record.read_text())
        tree = CheckedTree(Listing.from_json(raw["listing"]), dict(raw["checks"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _trees[str(record)] = (stat, tree)
    return tree


def check_tree(data_cfg, root: Path, *, crop_size: int = 1, resize: int | None = None) -> CheckedTree:
    """The tree listed (each file stat-ed once) and every file checked, each image decoded at most once
    (cached in ``data.cache_dir``): when some must be decoded and a tile store is wanted, the same
    decode builds the store of the files that can be used at ``crop_size`` after ``resize``."""
    from resnet_sweep.data import tiles

    listing = list_tree(root)
    every = [p for split in SPLITS for p in listing.files[split]]
    decode = tiles.check_and_store(data_cfg, listing, crop_size=crop_size, resize=resize)
    return CheckedTree(listing, image_checks(every, data_cfg.cache_dir, stamps=listing.stamps, decode=decode))


def checked_tree(
    data_cfg, root: Path, *, crop_size: int = 1, resize: int | None = None, share: Path | None = None
) -> CheckedTree:
    """``check_tree`` once per sweep: in a sweep's job (its ``share`` folder), the record its pre-flight
    or first job made (made now, under a file lock, when there is none); in a single run, now."""
    if share is None:
        return check_tree(data_cfg, root, crop_size=crop_size, resize=resize)
    return share_tree(share, data_cfg, root, crop_size=crop_size, resize=resize)


def share_tree(share: Path, data_cfg, root: Path, *, crop_size: int = 1, resize: int | None = None) -> CheckedTree:
    """The record of ``root`` in the sweep's ``share`` folder, made by ``check_tree`` if there is none."""
    record = record_of(share, root)
    tree = remembered(record)
    if tree is not None:
        return tree
    with FileLock(str(record) + ".lock"):
        tree = remembered(record)
        if tree is None:
            tree = check_tree(data_cfg, root, crop_size=crop_size, resize=resize)
            sealed.write_text(record, json.dumps({"listing": tree.listing.to_json(), "checks": tree.checks}))
            _trees[str(record)] = (_stat(record), tree)
    return tree
