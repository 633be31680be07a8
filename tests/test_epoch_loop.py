"""The epoch loop reads nothing back from the device inside an epoch: loss and accuracy are summed
there and read once; a loss that stops being finite still fails the run with one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from resnet_sweep.core.errors import Diverged
from resnet_sweep.training import engine

READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}
READS |= {torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}


class CountReads(TorchFunctionMode):
    """Counts the calls that wait for a tensor's value on the host (a sync on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in READS
        return func(*args, **(kwargs or {}))


def batches(n: int, classes: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


def head(classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(4, 1 if classes == 2 else classes)
    return nn.Sequential(linear, nn.Flatten(0)) if classes == 2 else linear


def reads_in_an_epoch(n_batches: int, prefix: str, classes: int = 2) -> int:
    model = head(classes)
    data, cpu = batches(n_batches, classes), torch.device("cpu")
    with CountReads() as mode:
        if prefix == "train":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            engine.train_one_epoch(
                model, data, device=cpu, precision="32", epoch=1, optimizer=optimizer, num_classes=classes
            )
        else:
            engine.validate(model, data, device=cpu, precision="32", epoch=1, num_classes=classes)
    return mode.reads


@pytest.mark.parametrize(("prefix", "classes"), [("train", 2), ("valid", 2), ("train", 3), ("valid", 3)])
def test_an_epoch_reads_the_device_a_fixed_number_of_times_whatever_its_length(prefix, classes):
    reads = reads_in_an_epoch(3, prefix, classes)
    assert reads > 0  # the epoch's figures, read once
    assert reads_in_an_epoch(30, prefix, classes) == reads


def test_the_sums_equal_the_mean_of_the_batch_losses_and_accuracies():
    data = batches(5)
    model = head()
    loss_fn = nn.BCEWithLogitsLoss()
    with torch.inference_mode():
        losses = [loss_fn(model(x), y.float()).item() for x, y in data]
        right = sum(int(((model(x) > 0) == y.bool()).sum()) for x, y in data)
    out = engine.validate(model, data, device=torch.device("cpu"), precision="32", epoch=0, num_classes=2)
    assert out["valid/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert out["valid/acc"] == pytest.approx(right / 40, rel=1e-6)


class Scaled(nn.Module):
    """The first feature times a trained scale: an infinite feature makes an infinite loss."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x[:, 0] * self.scale


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_a_loss_that_stops_being_finite_is_one_line_naming_the_epoch_and_its_first_kind(value, word):
    data = batches(6)
    x, y = data[2]
    data[2] = (torch.full_like(x, value), torch.zeros_like(y))  # the third batch's loss is not finite
    model = Scaled()  # (after an infinite loss, the next ones are NaN: the first one is named)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Diverged, match=f"^loss became {word} at epoch 7$"):
        engine.train_one_epoch(model, data, device=torch.device("cpu"), precision="32", epoch=7, optimizer=optimizer)
