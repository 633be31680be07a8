"""The search space, in hydra-optuna-sweeper's syntax: ``choice(a, b)`` / ``a,b`` -> categorical,
``range(a, b, step=s)`` -> int (or float) with step, ``interval(a, b)`` -> uniform,
``tag(log, interval(a, b))`` -> log-uniform."""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from resnet_sweep.core.errors import UserError


def distribution_from_override(override: Override) -> BaseDistribution | str:
    """A sweep override -> an Optuna distribution; a plain override -> its value string."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if value.shuffle:
            return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        # range(a, b, step=s) excludes b, as in Python and Hydra's grid: high = the last value taken
        start, stop, step = int(value.start), int(value.stop), int(value.step)
        return IntDistribution(start, start + step * ((stop - start - 1) // step), step=step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise UserError(f"{override.input_line}: not a sweep the Optuna sweeper understands")


def search_space(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """``key=value`` strings -> (distributions, fixed overrides)."""
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        value = distribution_from_override(override)
        if isinstance(value, BaseDistribution):
            distributions[key] = value
            fixed.pop(key, None)
        else:
            fixed[key] = value
            distributions.pop(key, None)
    return distributions, fixed


def grid_choices(name: str, d: BaseDistribution) -> list:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, (IntDistribution, FloatDistribution)) and d.step is not None and not d.log:
        n = round((d.high - d.low) / d.step) + 1
        return [d.low + i * d.step for i in range(n)]
    raise UserError(f"hydra.sweeper.params.{name}: the grid sampler needs choice(...) or range(...), not {d}")
