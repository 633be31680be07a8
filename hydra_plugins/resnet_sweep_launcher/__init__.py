"""``hydra/launcher=grouped`` (the default): Hydra's basic launcher, jobs in this process, with the
heads of compatible jobs trained together (``resnet_sweep.training.head_group``)."""
