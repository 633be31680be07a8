"""What a sweep varied, read from its child runs: the swept keys, the main one (the learning rate
where it varies), whether a key's values span decades (a log axis), and one colour per run from a
colour map over the main swept value. Shared by the dashboard, the runs' colours and the UI's view."""

from __future__ import annotations

import math
from dataclasses import dataclass

SEED = "seed"
OPTIMIZER_TAG = "optimizer"
LOG10 = "_log10"  # optimizer.lr_log10: the learning rate again, for MLflow's linear axes  # the optimizer's name is a tag (its _target_ is not a param)


@dataclass(frozen=True)
class Key:
    """One swept key: its values per run id, numeric or not, log scale or not."""

    name: str
    values: dict[str, str]  # run id -> the value as logged

    @property
    def numeric(self) -> bool:
        return all(_is_number(v) for v in self.values.values())

    @property
    def log(self) -> bool:
        """Numeric, positive, and the largest value at least 10 times the smallest (or a learning rate)."""
        if not self.numeric:
            return False
        numbers = [float(v) for v in self.values.values()]
        if min(numbers) <= 0:
            return False
        return self.name.endswith("lr") or max(numbers) / min(numbers) >= 10

    def number(self, run_id: str) -> float:
        return float(self.values[run_id])

    def levels(self) -> list[str]:
        """The distinct values, in order (numbers by value)."""
        distinct = set(self.values.values())
        return sorted(distinct, key=float) if self.numeric else sorted(distinct)

    def position(self, run_id: str) -> float:
        """Where the run's value lies between the smallest (0) and the largest (1): on a log scale
        for a log key, by rank for a categorical one."""
        if not self.numeric:
            levels = self.levels()
            return levels.index(self.values[run_id]) / max(len(levels) - 1, 1)
        scale = math.log10 if self.log else float
        lo, hi = (scale(float(v)) for v in (self.levels()[0], self.levels()[-1]))
        return 0.5 if hi == lo else (scale(self.number(run_id)) - lo) / (hi - lo)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def swept_keys(runs) -> list[Key]:
    """The params whose value differs between the runs (and that every run has), and the optimizer
    (a tag) where it differs; the main key first, the seed last, the rest by name."""
    keys = []
    common = set.intersection(*(set(r.data.params) for r in runs)) if runs else set()
    for name in sorted(n for n in common if not n.endswith(LOG10)):
        values = {r.info.run_id: r.data.params[name] for r in runs}
        if len(set(values.values())) > 1:
            keys.append(Key(name, values))
    optimizers = {r.info.run_id: r.data.tags.get(OPTIMIZER_TAG, "?") for r in runs}
    if len(set(optimizers.values())) > 1:
        keys.append(Key(OPTIMIZER_TAG, optimizers))
    main = main_key(keys)
    rest = sorted((k for k in keys if k is not main), key=lambda k: (k.name == SEED, k.name))
    return ([main] if main else []) + rest


def main_key(keys: list[Key]) -> Key | None:
    """The key runs are coloured by: the learning rate where it varies, else the first numeric key
    that is not the seed, else the first key that is not the seed, else the seed."""
    for wanted in (
        lambda k: k.name.endswith("lr"),
        lambda k: k.numeric and k.name != SEED,
        lambda k: k.name != SEED,
        lambda k: True,
    ):
        found = next((k for k in keys if wanted(k)), None)
        if found:
            return found
    return None


COLOUR_MAP = "viridis"
COLOUR_RANGE = (0.0, 0.88)  # viridis' last yellows are hard to read on white
CATEGORY_MAP = "tab10"


def colour(key: Key | None, run_id: str) -> str:
    """The run's colour, ``#rrggbb``: viridis over the main swept value (log scale for a log key);
    a categorical key's values get tab10's distinct colours."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if key is None or run_id not in key.values:
        return to_hex(colormaps[COLOUR_MAP](0.5))
    if not key.numeric:
        return to_hex(colormaps[CATEGORY_MAP](key.levels().index(key.values[run_id]) % 10))
    lo, hi = COLOUR_RANGE
    return to_hex(colormaps[COLOUR_MAP](lo + (hi - lo) * key.position(run_id)))


def colour_scale(steps: int = 9) -> list[list]:
    """The numeric colour map as a plotly colour scale (for a colour bar beside the runs)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    lo, hi = COLOUR_RANGE
    return [[i / (steps - 1), to_hex(colormaps[COLOUR_MAP](lo + (hi - lo) * i / (steps - 1)))] for i in range(steps)]
