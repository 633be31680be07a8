"""resnet-sweep's Optuna sweeper for Hydra (``hydra/sweeper=optuna``): Optuna >= 4 ask/tell with
persistent and resumable studies, pruning, NaN-safe failures. Config keys and override syntax follow
hydra-optuna-sweeper, so existing sweeper configs carry over."""
