"""resnet-sweep: Hydra multirun sweeps for transfer learning with torchvision ResNets, tracked in MLflow."""

__version__ = "0.1.0"
