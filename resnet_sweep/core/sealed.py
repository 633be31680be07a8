"""Cache folders written once, whole, and verified when opened: the feature bank and the tile store.

A folder ``<root>/<key>`` is built by one job under a file lock (``<root>/<key>.lock``) while
concurrent jobs wait, written to a temp folder beside it and renamed into place, so no job ever sees
half of one. Its ``meta.json`` records every file's size and SHA-256, and its own checksum
(``seal``). ``check`` verifies a folder when a process first opens it; a damaged one (changed bytes,
truncated, a file missing or extra, meta.json unreadable) is reported in one warning line and
rebuilt (``build_once``), never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

from resnet_sweep.core.registry import PROCESS

T = TypeVar("T")

# SHA-256: 1.5 GB/s on one core with the CPU's SHA extensions (AMD Zen, Intel Ice Lake and later, ARMv8),
# about 0.5 GB/s without them (blake2b: 0.9 GB/s either way)
DIGEST = "sha256"

# folder -> (the (name, size, mtime, inode) of its files when it was verified, its meta):
# hashed once per process, again only if a file visibly changed (see ``check``)
_verified: dict[str, tuple[tuple, dict]] = PROCESS.state("sealed.verified")


def digest(path: Path, chunk: int = 1 << 20) -> str:
    """The file's ``DIGEST``, read in 1 MiB chunks (hashlib releases the GIL while hashing)."""
    h = hashlib.new(DIGEST)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def json_key(value, length: int = 64) -> str:
    """A cache key: the first ``length`` hex digits of the SHA-256 of ``value`` as JSON with sorted
    keys (values JSON cannot hold, as ``str``)."""
    return hashlib.new(DIGEST, json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def meta_checksum(meta: dict) -> str:
    return json_key({k: v for k, v in meta.items() if k != "checksum"})


def write_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole, or what it held before: written beside it, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def folder_lock(root: Path, key: str) -> FileLock:
    """The lock under which one process (re)builds the folder ``root/key``."""
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / f"{key}.lock"))


def replace_folder(root: Path, key: str, fill: Callable[[Path], T]) -> T:
    """``fill(tmp)`` fills a new folder beside ``root/key``, which is then renamed into place: no one
    ever sees half of it. A folder already there (damaged, or half-written by a killed process) is
    moved aside in one rename and deleted once the new one is in place; on failure the new one is
    removed. Call it holding ``folder_lock(root, key)``."""
    path = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    old = None
    try:
        result = fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{key}-damaged-", dir=root))
            path.rename(old / key)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return result


def seal(folder: Path, meta: dict) -> dict:
    """Record every file in ``folder`` (size and digest) and meta's own checksum in meta.json."""
    meta = {
        **meta,
        "digest": DIGEST,
        "files": {
            f.name: {"size": f.stat().st_size, DIGEST: digest(f)}
            for f in sorted(folder.iterdir())
            if f.name != "meta.json"
        },
    }
    meta["checksum"] = meta_checksum(meta)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def listing(path: Path) -> tuple:
    """(name, size, mtime, inode) of each file in the folder, sorted: what ``check`` remembers."""
    entries = []
    for entry in os.scandir(path):
        st = entry.stat()
        entries.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(entries))


def check(path: Path, validate: Callable[[dict], object] | None = None) -> tuple[dict | None, str | None]:
    """``(meta, None)`` when the folder in ``path`` is whole, ``(None, None)`` when there is none,
    ``(None, what is wrong)`` when it is damaged: meta.json missing, unreadable or changed, a file
    missing, extra, of another size, or whose bytes no longer match their recorded digest.
    ``validate(meta)`` raises (KeyError, ValueError, TypeError) when meta lacks a field its user needs.

    Hashing runs at 0.5-1.5 GB/s and reads the pages the job then reads anyway. It is done once per
    process and folder, and again only when a file's size, mtime or inode changed since: the jobs a
    launcher runs one after another in one process pay it once."""
    try:
        now = listing(path)
    except FileNotFoundError as e:
        return (None, None) if not path.exists() else (None, f"cannot list it ({e.strerror or e})")
    except OSError as e:
        return None, f"cannot list it ({e.strerror or e})"
    known = _verified.get(str(path))
    if known and known[0] == now:
        return known[1], None
    sizes = {name: size for name, size, _, _ in now}
    if "meta.json" not in sizes:
        return None, "meta.json is missing"
    try:
        meta = json.loads((path / "meta.json").read_text())
        recorded = {name: (int(f["size"]), str(f[DIGEST])) for name, f in meta["files"].items()}
        if validate is not None:
            validate(meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"meta.json is unreadable ({type(e).__name__}: {e})"
    if meta.get("checksum") != meta_checksum(meta):
        return None, "meta.json does not match its checksum"
    problems = [f"{name} is missing" for name in sorted(set(recorded) - set(sizes))]
    problems += [f"{name} is not part of it" for name in sorted(set(sizes) - set(recorded) - {"meta.json"})]
    for name in sorted(set(recorded) & set(sizes)):
        if sizes[name] != recorded[name][0]:
            problems.append(
                f"{name} is {sizes[name]:,} bytes, not {recorded[name][0]:,}"
                + (" (truncated)" if sizes[name] < recorded[name][0] else "")
            )
    if not problems:  # hash only what has the right size
        for name in sorted(recorded):
            try:
                if digest(path / name) != recorded[name][1]:
                    problems.append(f"{name} has changed bytes (its {DIGEST} differs from the recorded one)")
            except OSError as e:
                problems.append(f"{name} is unreadable ({e.strerror or e})")
    if problems:
        return None, "; ".join(problems)
    _verified[str(path)] = (now, meta)
    return meta, None


def build_once(
    root: Path,
    key: str,
    make: Callable[[Path], dict],
    *,
    what: str,
    log: logging.Logger,
    validate: Callable[[dict], object] | None = None,
    checked: bool = False,
) -> dict:
    """The meta of the whole folder ``root/key``: as it is when ``check`` finds it whole, else built by
    ``make(tmp)`` (which fills the empty folder ``tmp`` and returns its meta) under a file lock, so
    that concurrent jobs build it once; sealed, and renamed into place. A damaged folder is one
    warning line (``<what> <path> is damaged: ...; rebuilding it``), moved aside in one rename and
    deleted once the new one is in place. ``checked``: the caller's own ``check`` just found it not
    whole, so it is checked again only under the lock (not hashed once more before it)."""
    path = root / key
    if not checked:
        meta, _ = check(path, validate)
        if meta is not None:
            return meta
    with folder_lock(root, key):
        meta, problem = check(path, validate)  # again: another job may have (re)built it meanwhile
        if meta is not None:
            return meta
        if problem:
            log.warning("%s %s is damaged: %s; rebuilding it", what, path, problem)
        meta = replace_folder(root, key, lambda tmp: seal(tmp, make(tmp)))
        _verified[str(path)] = (listing(path), meta)
    return meta
