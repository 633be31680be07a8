"""Registers resnet-sweep's typed config schemas (``resnet_sweep.config.schema``) in Hydra's ConfigStore.
Hydra imports every module under ``hydra_plugins`` before it composes a config, so every entry
point (``train.py``, the compose API, the sweepers) finds them."""

from resnet_sweep.config.schema import register

register()
