"""The app's config with a trivial job instead of training (Hydra's ``example/sphere.py`` for our
sweepers): objective = (log10(optimizer.lr) + 3)^2 + 0.1 * epochs left, reported once per epoch.

- ``optimizer.lr`` above 1e30: the job returns NaN (a diverged trial);
- a file ``interrupt-once`` in the working folder: the first job deletes it and returns
  ``hpo.INTERRUPTED`` (an infrastructure stop);
- every job appends its point (lr, optimizer target, data root) to ``jobs.jsonl``.
"""

import json
import math
from pathlib import Path

import hydra

import resnet_sweep  # noqa: F401  (the rs.* resolvers the presets use)

REPO = Path(__file__).resolve().parents[2]


def objective(cfg) -> float | str:
    from resnet_sweep.tracking import hpo

    lr = float(cfg.optimizer.lr)
    with open("jobs.jsonl", "a") as f:
        point = {"lr": lr, "optimizer": str(cfg.optimizer._target_), "root": str(cfg.data.get("root"))}
        f.write(json.dumps(point) + "\n")
    marker = Path("interrupt-once")
    if marker.exists():
        marker.unlink()
        return hpo.INTERRUPTED
    if lr > 1e30:
        return math.nan
    from hydra.core.hydra_config import HydraConfig

    report = hpo.reporter(cfg.get("hpo_trial"), HydraConfig.get().sweeper)
    epochs = int(cfg.trainer.max_epochs)
    value = math.inf
    for epoch in range(epochs):
        value = (math.log10(lr) + 3) ** 2 + 0.1 * (epochs - 1 - epoch)
        if report:
            try:
                report(epoch, value)
            except hpo.Pruned:
                return hpo.PRUNED
    return value


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="train")
def main(cfg):
    return objective(cfg)


if __name__ == "__main__":
    main()
