"""What this process remembers from one job to the next, in one place: the stop flag, the caches
(folders verified, tile store sizes, the sweep's shared data), the registries (in-memory Optuna
studies, the storage's outages) and the locks it holds. Each module makes its state here
(``PROCESS.state``) or says how to let it go (``PROCESS.on_reset``), so that ``PROCESS.reset()``
returns the process to how it started: what the tests do between runs in one process, instead of
finding each cache by its name."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping


class Registries:
    """The process's state, each piece by name; ``reset`` puts every piece back as it started."""

    def __init__(self) -> None:
        self._resets: dict[str, Callable[[], None]] = {}

    def state(self, name: str, initial: Mapping | None = None) -> dict:
        """A dict held by this process (back to ``initial`` on ``reset``); one per ``name``."""
        held: dict = dict(copy.deepcopy(initial or {}))

        def reset() -> None:
            held.clear()
            held.update(copy.deepcopy(initial or {}))

        self.on_reset(name, reset)
        return held

    def on_reset(self, name: str, reset: Callable[[], None]) -> None:
        """``reset()`` lets go of what ``name`` holds (locks, open files) when the process is reset."""
        if name in self._resets:
            raise ValueError(f"process state {name!r} is registered twice")
        self._resets[name] = reset

    def names(self) -> list[str]:
        return sorted(self._resets)

    def reset(self) -> None:
        """Every piece back to how a fresh process starts it."""
        for reset in list(self._resets.values()):
            reset()


PROCESS = Registries()
