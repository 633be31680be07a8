from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import OptunaSweeperConf  # noqa: F401  (registers the configs)


class OptunaSweeper(Sweeper):
    """Thin plugin shell: Hydra imports every plugin module at start-up, so Optuna is imported only
    when this sweeper is used."""

    def __init__(self, **keys: Any) -> None:
        """``keys``: the sweeper's config (``config.OptunaSweeperConf``), handed to the implementation."""
        from ._impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(**keys)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
