"""OmegaConf resolvers used by the configs (registered when resnet_sweep is imported)."""

from __future__ import annotations

from omegaconf import OmegaConf


def epoch_budget(lr, table) -> int:
    """The study's rule: max epochs by learning rate. ``table`` rows are ``[lr_max, epochs]`` in
    increasing lr_max; the first row with ``lr <= lr_max`` applies."""
    lr = float(lr)
    for lr_max, epochs in table:
        if lr <= float(lr_max):
            return int(epochs)
    return int(table[-1][1])


def mode(objective) -> str:
    """ReduceLROnPlateau's ``mode``, torch's spelling of the objective's direction: min | max."""
    from resnet_sweep.config.objective import direction

    return direction(str(objective))[:3]


OmegaConf.register_new_resolver("rs.epoch_budget", epoch_budget, replace=True)
OmegaConf.register_new_resolver("rs.mode", mode, replace=True)
