"""Passwords never leave the process: ``postgresql://user:secret@host/db`` is shown as
``postgresql://user:***@host/db`` in messages, MLflow tags and params, Hydra's saved configs and every
log record (a log-record factory, installed when this module is first imported)."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.\-]*\\?://[^:/@\s\\]*\\?:)(?P<pw>[^@/\s]+)@")


def redact(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['pre']}***@", str(text))


def _redacting_record_factory(factory):
    """Every log record (Hydra's "#0 : overrides" lines included) goes out with passwords masked."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        if isinstance(record.msg, str) and "@" in record.msg:
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(a) if isinstance(a, str) and "@" in a else a for a in record.args)
        return record

    make.redacting = True
    return make


if not getattr(logging.getLogRecordFactory(), "redacting", False):
    logging.setLogRecordFactory(_redacting_record_factory(logging.getLogRecordFactory()))


def redact_files(folder: Path) -> None:
    """Hydra saves the composed config and the overrides as typed (.hydra/*.yaml, multirun.yaml):
    mask passwords there too."""
    for path in list(folder.glob("*.yaml")) + list(folder.glob(".hydra/*.yaml")):
        with contextlib.suppress(OSError):
            text = path.read_text()
            masked = redact(text)
            if masked != text:
                path.write_text(masked)
