"""K heads of one shape trained as one: stacked parameters (``[K, ...]``), one forward, one backward
and one optimizer step for all of them, each head with its own learning rate, hyperparameters,
optimizer state and dropout stream, so that each computes what it computes alone (``engine.fit``
with torch's own SGD, Adam or AdamW).

The per-head optimizers follow torch's update rules operation for operation (weight decay, momentum
and dampening, Nesterov; Adam's bias corrections in float64 as torch computes them); ``update``
(one bool per head) leaves a head untouched, parameters and state, where it is False.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# activations applied to the stacked tensor as they are (elementwise, no parameters, no randomness)
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Identity)
OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def head_signature(head: nn.Module) -> tuple | None:
    """What two heads must share to be stacked (layer types, shapes, activations, dropout), or None
    for a head this module cannot stack."""
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    spec = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            spec.append(("linear", layer.in_features, layer.out_features, layer.bias is not None))
        elif isinstance(layer, nn.Dropout):
            spec.append(("dropout", float(layer.p)))
        elif type(layer) in ELEMENTWISE and not list(layer.parameters()):
            spec.append((type(layer).__name__, repr(layer)))
        else:
            return None
    return tuple(spec)


def optimizer_signature(optimizer: torch.optim.Optimizer) -> tuple | None:
    """What two heads' optimizers must share to step together, or None where this module has no
    stacked twin of the optimizer (another class, several groups, maximize, amsgrad, ...)."""
    if type(optimizer) not in OPTIMIZERS or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if group.get("maximize") or group.get("amsgrad") or group.get("differentiable"):
        return None
    if isinstance(optimizer, torch.optim.SGD):
        return ("sgd", bool(group.get("nesterov")))
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
    return ("adam", decoupled)


class StackedHeads:
    """The parameters of K heads (``models.Head`` or a bare ``nn.Linear``) stacked along a first
    dimension, in the order of ``head.parameters()``: ``params[i][k]`` is head k's i-th parameter."""

    def __init__(self, heads: list[nn.Module], device: torch.device):
        self.layers = list(heads[0]) if isinstance(heads[0], nn.Sequential) else [heads[0]]
        each = [list(h.parameters()) for h in heads]
        self.params = [
            torch.stack([p[i].detach().to(device, torch.float32) for p in each]).requires_grad_(True)
            for i in range(len(each[0]))
        ]
        self.device = device

    def __len__(self) -> int:
        return self.params[0].shape[0]

    def forward(self, x: torch.Tensor, *, dropout: list | None = None) -> torch.Tensor:
        """Logits ``[K, B, out]`` of ``x``: ``[K, B, in]`` (one batch per head) or ``[B, in]`` (the
        same batch for every head). ``dropout``: one generator state per head (dropout applied and
        the state advanced) or None (that head not training); None: no dropout at all."""
        i = 0
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                weight = self.params[i].transpose(1, 2)
                bias = self.params[i + 1].unsqueeze(1) if layer.bias is not None else None
                i += 2 if layer.bias is not None else 1
                if x.dim() == 2:
                    x = torch.matmul(x, weight)
                    x = x + bias if bias is not None else x
                elif bias is not None:
                    x = torch.baddbmm(bias, x, weight)
                else:
                    x = torch.bmm(x, weight)
            elif isinstance(layer, nn.Dropout):
                if dropout is not None and any(s is not None for s in dropout):
                    x = self._dropout(x, layer.p, dropout)
            else:
                x = layer(x)
        return x

    def _dropout(self, x: torch.Tensor, p: float, states: list) -> torch.Tensor:
        """Each training head's slice through ``F.dropout`` with that head's own generator state, so
        its masks are the ones it draws alone (the device's default generator, swapped in and out)."""
        gen = default_generator(x.device)
        saved = gen.get_state()
        out = []
        try:
            for k, state in enumerate(states):
                if state is None:
                    out.append(x[k])
                    continue
                gen.set_state(state)
                out.append(F.dropout(x[k], p, training=True))
                states[k] = gen.get_state()
        finally:
            gen.set_state(saved)
        return torch.stack(out)

    def copy_to(self, k: int, head: nn.Module) -> None:
        """Head k's parameters into ``head`` (a real module: its checkpoint, its resume state)."""
        with torch.no_grad():
            for stacked, p in zip(self.params, head.parameters(), strict=True):
                p.copy_(stacked[k])


def default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _per_head(values, like: torch.Tensor) -> torch.Tensor:
    """``[K]`` values shaped to broadcast over ``like`` (``[K, ...]``)."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """torch's SGD or Adam/AdamW over ``StackedHeads``, one set of hyperparameters per head (read
    from each head's real optimizer, whose state it can load and give back: ``load``/``store``)."""

    def __init__(self, heads: StackedHeads, optimizers: list[torch.optim.Optimizer]):
        self.heads, self.kind = heads, optimizer_signature(optimizers[0])
        groups = [o.param_groups[0] for o in optimizers]
        dev = heads.device

        def hyper(key, default=0.0, index=None):
            vals = [g.get(key, default) if index is None else g[key][index] for g in groups]
            return torch.tensor([float(v) for v in vals], dtype=torch.float64, device=dev)

        self.lr = hyper("lr")
        self.weight_decay = hyper("weight_decay")
        if self.kind[0] == "sgd":
            self.momentum, self.dampening = hyper("momentum"), hyper("dampening")
            self.buffers = [torch.zeros_like(p) for p in heads.params]
            self.has_buffer = torch.zeros(len(heads), dtype=torch.bool, device=dev)
        else:
            self.beta1, self.beta2, self.eps = hyper("betas", index=0), hyper("betas", index=1), hyper("eps")
            self.exp_avg = [torch.zeros_like(p) for p in heads.params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in heads.params]
            self.steps = torch.zeros(len(heads), dtype=torch.float64, device=dev)

    def set_lr(self, k: int, lr: float) -> None:
        self.lr[k] = float(lr)

    @torch.no_grad()
    def step(self, update: torch.Tensor) -> None:
        """One step of every head where ``update`` ([K] bool) is True; the others keep their
        parameters and state. Gradients are cleared."""
        if self.kind[0] == "sgd":
            self._sgd(update)
        else:
            self._adam(update)
        for p in self.heads.params:
            p.grad = None

    def _sgd(self, update):
        nesterov = self.kind[1]
        for i, p in enumerate(self.heads.params):
            g = p.grad + _per_head(self.weight_decay, p) * p
            mom = _per_head(self.momentum, p)
            buf = self.buffers[i]
            first = _per_head(~self.has_buffer, p).bool()
            new_buf = torch.where(first, g, buf * mom + _per_head(1 - self.dampening, p) * g)
            uses = _per_head(self.momentum != 0, p).bool()
            direction = torch.where(uses, g + mom * new_buf if nesterov else new_buf, g)
            mask = _per_head(update, p).bool()
            buf.copy_(torch.where(mask & uses, new_buf, buf))
            p.copy_(torch.where(mask, p - _per_head(self.lr, p) * direction, p))
        self.has_buffer |= update & (self.momentum != 0)

    def _adam(self, update):
        decoupled = self.kind[1]
        steps = self.steps + update.to(self.steps.dtype)
        bias1 = 1 - self.beta1**steps
        bias2_sqrt = (1 - self.beta2**steps).sqrt()
        step_size = self.lr / bias1
        for i, p in enumerate(self.heads.params):
            mask = _per_head(update, p).bool()
            g = p.grad
            if decoupled:
                param = p * _per_head(1 - self.lr * self.weight_decay, p)
            else:
                param = p
                g = g + _per_head(self.weight_decay, p) * p
            m = torch.lerp(self.exp_avg[i], g, _per_head(1 - self.beta1, p))
            v = self.exp_avg_sq[i] * _per_head(self.beta2, p) + _per_head(1 - self.beta2, p) * (g * g)
            denom = v.sqrt() / _per_head(bias2_sqrt, p) + _per_head(self.eps, p)
            new = param + (m / denom) * _per_head(-step_size, p)
            self.exp_avg[i].copy_(torch.where(mask, m, self.exp_avg[i]))
            self.exp_avg_sq[i].copy_(torch.where(mask, v, self.exp_avg_sq[i]))
            p.copy_(torch.where(mask, new, p))
        self.steps.copy_(steps)

    # ------------------------------------------------------------ one head's state <-> torch's
    @torch.no_grad()
    def store(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        """Head k's optimizer state into its real ``optimizer`` (for ``state_dict()``: resume)."""
        params = optimizer.param_groups[0]["params"]
        for i, p in enumerate(params):
            if self.kind[0] == "sgd":
                if bool(self.has_buffer[k]):
                    optimizer.state[p] = {"momentum_buffer": self.buffers[i][k].detach().clone().to(p.device)}
            elif float(self.steps[k]) > 0:
                optimizer.state[p] = {
                    "step": torch.tensor(float(self.steps[k]), dtype=torch.float32),
                    "exp_avg": self.exp_avg[i][k].detach().clone().to(p.device),
                    "exp_avg_sq": self.exp_avg_sq[i][k].detach().clone().to(p.device),
                }

    @torch.no_grad()
    def load(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        """Head k's state from its real ``optimizer`` (restored from a resume state, or fresh)."""
        params = optimizer.param_groups[0]["params"]
        for i, p in enumerate(params):
            state = optimizer.state.get(p) or {}
            if self.kind[0] == "sgd":
                if state.get("momentum_buffer") is not None:
                    self.buffers[i][k].copy_(state["momentum_buffer"])
                    self.has_buffer[k] = True
            elif "step" in state:
                self.exp_avg[i][k].copy_(state["exp_avg"])
                self.exp_avg_sq[i][k].copy_(state["exp_avg_sq"])
                self.steps[k] = float(state["step"])
        self.lr[k] = float(optimizer.param_groups[0]["lr"])
