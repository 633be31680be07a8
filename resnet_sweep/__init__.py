"""resnet-sweep: Hydra multirun sweeps for transfer learning with torchvision ResNets, tracked in MLflow."""

from resnet_sweep.config import resolvers  # noqa: F401  (config resolvers such as rs.epoch_budget)

__version__ = "0.1.0"
