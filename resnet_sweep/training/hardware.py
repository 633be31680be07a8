"""The machine a job trains on: ``trainer.device`` as a torch device (a parallel sweep's GPU from
``devices``), bf16 autocast where the hardware runs it fast (``trainer.precision``), and glibc's
malloc keeping freed memory for the next batch."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from pathlib import Path

import torch

from resnet_sweep.config import checks
from resnet_sweep.core.errors import UserError
from resnet_sweep.training import devices


def resolve_device(name: str, *, hydra_cfg=None) -> torch.device:
    """``trainer.device`` as a torch device: ``auto`` (a GPU when CUDA is available, else the CPU), ``cpu``,
    ``cuda`` (a GPU) or ``cuda:N`` (that one). ``auto`` and ``cuda`` name the GPU: ``cuda:0``, or, in a
    worker of a parallel sweep (``hydra/launcher=joblib`` or ``gpus``), the GPU of the worker's launcher
    slot (``devices.pick_gpu``: the sweep's jobs spread over the visible GPUs, at most
    ceil(n_jobs / GPUs) on one at once, each worker keeping its GPU). A GPU becomes torch's current
    device, so nothing lands on GPU 0 by default. ``hydra_cfg``: the job's ``hydra.*``
    (``JobContext.hydra``; None outside Hydra)."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = check_device(name)
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", devices.pick_gpu(gpus=torch.cuda.device_count(), hydra_cfg=hydra_cfg))
    torch.cuda.set_device(device)
    return device


def check_device(name: str) -> torch.device:
    """``trainer.device`` on this machine, nothing chosen or touched: ``cuda`` where CUDA is not
    available, or ``cuda:N`` past the GPUs visible, is one line (``preflight.check_job``, before any run)."""
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu"))
    except RuntimeError:
        raise UserError(f"trainer.device={name}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name}: CUDA is not available here; use auto or cpu")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= gpus:
        raise UserError(f"trainer.device={name}: only {gpus} GPU(s) visible here (cuda:0..cuda:{gpus - 1})")
    return device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory instead of handing it back to the kernel.

    By default glibc serves every allocation above its mmap threshold (at most 32 MB) with fresh
    pages from the kernel and unmaps them on free, and trims the heap's free top. A ResNet forward
    allocates such activations at every layer (batch 64 at 224 px: 100 MB after the first conv),
    so every batch page-faults and zero-fills them again. On the 2-core CI machine that was a third
    of the time of a bf16 ResNet18 forward: 153 img/s at batch 64 by default, 230 img/s with this
    (kernel time 19 s -> 0.7 s over the same work), and the peak resident memory grew by 0.3 GB.
    The process keeps its peak heap until it exits. ``RESNET_SWEEP_MALLOC=default`` keeps glibc's
    defaults. Returns whether the setting was applied (glibc only; elsewhere a no-op)."""
    if os.environ.get("RESNET_SWEEP_MALLOC", "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 fast (AMX or AVX512-BF16); read once a process (``/proc/cpuinfo``
    took 2-5 ms a read on a 2-core VM: a training step of a small head is less)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device``; ``auto``: where the hardware runs it fast
    (AMX/AVX512-BF16 CPUs, bf16 GPUs; an AVX2-only CPU runs a bf16 ResNet18 some 30x slower than fp32)."""
    use = checks.precision(precision)
    if use is None:  # auto
        use = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and cpu_has_bf16())
    return use


def autocast(device: torch.device, precision: str):
    """bf16 autocast where ``uses_bf16`` says so, else nothing."""
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
