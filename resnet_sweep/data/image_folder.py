"""The ImageFolder tree on disk: ``root/{train,valid,test}/{class_a,class_b}/*``, listed once
(``list_tree``: its classes, files and each file's stamp) and fingerprinted from those stamps. A
missing split or a wrong number of classes is one line naming the path and what to do."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from resnet_sweep.config.checks import SPLITS
from resnet_sweep.core.errors import UserError


def is_image(path: Path) -> bool:
    """A file that should hold an image: every regular file of a class folder except hidden ones
    (``.DS_Store``, ``._*`` resource forks). Whether it decodes is checked by check_images."""
    return path.is_file() and not path.name.startswith(".")


def class_folders(split_folder: Path) -> list[str]:
    """The class folders of a split, sorted (hidden folders are not classes)."""
    return sorted(p.name for p in split_folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_images(class_folder: Path) -> list[Path]:
    """The images of a class folder, sorted (sub-folders included)."""
    return sorted(p for p in class_folder.rglob("*") if is_image(p))


@dataclass
class Listing:
    """The ImageFolder tree as ``list_tree`` found it, once: its classes, every image file of each
    split in the loaders' order with its label, and each file's stamp (resolved path, size, mtime),
    from which every fingerprint of these files is computed without touching the disk again."""

    root: Path
    classes: list[str]
    files: dict[str, list[Path]]
    labels: dict[str, list[int]]
    stamps: dict[str, tuple[str, int, int]]  # str(path) -> (resolved path, size, mtime_ns)
    fingerprints: dict[str, str] = field(default_factory=dict)  # "all" and each split's, once computed

    @property
    def fingerprint(self) -> str:
        """``fingerprint`` of every listed file (what ``data.data_fingerprint`` returns), computed once."""
        if "all" not in self.fingerprints:
            self.fingerprints["all"] = fingerprint([p for s in SPLITS for p in self.files[s]], self.stamps)
        return self.fingerprints["all"]

    def split_fingerprint(self, split: str) -> str:
        """``fingerprint`` of one split's listed files, computed once."""
        if split not in self.fingerprints:
            self.fingerprints[split] = fingerprint(self.files[split], self.stamps)
        return self.fingerprints[split]

    def to_json(self) -> dict:
        for split in SPLITS:  # computed here once, for every process that reads the record
            self.split_fingerprint(split)
        return {
            "root": str(self.root),
            "classes": self.classes,
            "files": {s: [str(p) for p in paths] for s, paths in self.files.items()},
            "labels": self.labels,
            "stamps": self.stamps,
            "fingerprints": {"all": self.fingerprint, **self.fingerprints},
        }

    @classmethod
    def from_json(cls, record: dict) -> Listing:
        return cls(
            root=Path(record["root"]),
            classes=list(record["classes"]),
            files={s: [Path(p) for p in paths] for s, paths in record["files"].items()},
            labels={s: list(v) for s, v in record["labels"].items()},
            stamps={k: (v[0], int(v[1]), int(v[2])) for k, v in record["stamps"].items()},
            fingerprints={k: str(v) for k, v in record["fingerprints"].items()},
        )


def _image_files(folder: Path, real: str, stamps: dict) -> list[Path]:
    """``class_images(folder)`` with each file's stamp recorded in ``stamps``, ``real`` being the
    folder's resolved path: one ``stat`` per file, a ``realpath`` only for symlinks (as pathlib's
    ``rglob``, sub-folders that are symlinks are not entered)."""
    found = []
    with os.scandir(folder) as entries:
        entries = list(entries)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            found.extend(_image_files(Path(entry.path), f"{real}/{entry.name}", stamps))
        elif entry.is_file() and not entry.name.startswith("."):
            st = entry.stat()
            resolved = os.path.realpath(entry.path) if entry.is_symlink() else f"{real}/{entry.name}"
            stamps[entry.path] = (resolved, st.st_size, st.st_mtime_ns)
            found.append(Path(entry.path))
    return found


def list_tree(root: Path) -> Listing:
    """The tree's classes and files, each file stat-ed once; raises UserError naming the path and what
    to do for a missing split, a split with fewer than two class folders, an empty class folder, or
    class folders that differ between splits. Whether images decode is ``image_checks``' business."""
    where = f"data.root={root}"
    root = Path(root)
    classes_by_split: dict[str, list[str]] = {}
    files: dict[str, list[Path]] = {}
    labels: dict[str, list[int]] = {}
    stamps: dict[str, tuple[str, int, int]] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise UserError(
                f"{where}: missing split folder '{split}' ({folder}); expected train/, valid/ and "
                "test/, each with one folder per class"
            )
        classes = class_folders(folder)
        if len(classes) < 2:
            shown = ", ".join(f"'{c}'" for c in classes) or "none"
            raise UserError(
                f"{where}: split '{split}' has {len(classes)} class folder"
                f"{'' if len(classes) == 1 else 's'} ({shown}); expected 2 or more, one per class"
            )
        classes_by_split[split] = classes
        files[split], labels[split] = [], []
        for label, cls in enumerate(classes):
            found = sorted(_image_files(folder / cls, os.path.realpath(folder / cls), stamps))
            if not found:
                raise UserError(f"{where}: {folder / cls} has no images; add images or remove the folder")
            files[split].extend(found)
            labels[split].extend([label] * len(found))
    train_classes = classes_by_split["train"]
    for split in ("valid", "test"):
        if classes_by_split[split] != train_classes:
            missing = [c for c in train_classes if c not in classes_by_split[split]]
            extra = [c for c in classes_by_split[split] if c not in train_classes]
            what = (
                f"{split}/ has no folder '{missing[0]}' ({root / split / missing[0]})"
                if missing
                else f"{split}/{extra[0]} is not a class folder of train/"
            )
            raise UserError(
                f"{where}: class folders differ between splits: {what}; train has {train_classes}, "
                f"{split} has {classes_by_split[split]}; use the same class folders in every split"
            )
    return Listing(root, train_classes, files, labels, stamps)


def stamps_of(paths: list[Path]) -> dict[str, tuple[str, int, int]]:
    out = {}
    for p in paths:
        st = p.stat()
        out[str(p)] = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    return out


def fingerprint(paths: list[Path], stamps: dict | None = None) -> str:
    """Identifies a set of files by path, size and modification time; with ``stamps``
    (``Listing.stamps``, the same values as found when the tree was listed) without stat-ing them."""
    h = hashlib.sha256()
    for p in sorted(paths):
        resolved, size, mtime = stamps[str(p)] if stamps is not None else stamps_of([p])[str(p)]
        h.update(f"{resolved}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def split_fingerprint(listing: Listing | None, files: dict[str, list[Path]], split: str) -> str:
    """``image_folder.fingerprint(files[split])``: the listing's own (computed once) when they are its files,
    else from its stamps (or, without a listing, from the disk)."""
    if listing is not None and files[split] is listing.files[split]:
        return listing.split_fingerprint(split)
    return fingerprint(files[split], listing.stamps if listing is not None else None)
