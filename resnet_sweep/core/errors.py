"""The errors a user sees, and how they are shown: one line, no traceback. Imports nothing of ours."""

from __future__ import annotations

import os
import sys

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """Something the user can fix: Hydra prints it as one line, without a traceback
    (unless HYDRA_FULL_ERROR=1)."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the run is stopped and marked failed."""


class Locked(UserError):
    """Another process is running this very job right now."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type's name when it has none."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def exit_with(message: str, code: int = 1):
    """One line on stderr and a non-zero exit; the full traceback with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise UserError(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)
