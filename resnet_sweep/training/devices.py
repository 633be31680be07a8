"""Which GPU each job of a parallel sweep runs on, and whether that many jobs fit on one GPU.

With ``hydra/launcher=joblib`` (or the ``gpus`` preset) a sweep runs ``hydra.launcher.n_jobs``
worker processes at once. Each worker, at its first job, claims the lowest free *slot* of
``0..n_jobs-1`` (a lock file in the sweep's folder, held until the worker exits) and runs every job
it is handed on GPU ``slot mod GPUs``. So the jobs of a batch spread evenly over the visible GPUs, a
worker (and so each of its jobs) keeps one GPU and one CUDA context, and no GPU ever has more than
``k = ceil(n_jobs / GPUs)`` jobs at once, whatever their durations. ``check_memory`` tells, before
the sweep starts, whether k jobs fit in a GPU's free memory.

The pure parts (``gpu_of_slot``, ``spread``, ``lowest_free``, ``jobs_per_gpu``, ``check_memory``)
take plain numbers, so that they are tested on a CPU. Imports no torch at module level.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

from resnet_sweep.config import checks
from resnet_sweep.core.registry import PROCESS

log = logging.getLogger(__name__)

GIB = 2**30
CONTEXT_BYTES = 600 * 2**20  # a CUDA context with cuBLAS/cuDNN workspaces, before any tensor: ~0.5-0.7 GiB
SLOTS_FOLDER = ".devices"  # under hydra.sweep.dir: one lock file per launcher slot


# --- the assignment (pure) ---------------------------------------------------------------------------


def gpu_of_slot(slot: int, *, gpus: int) -> int:
    """The GPU index of launcher slot ``slot`` (>= 0) among ``gpus`` (>= 1) visible GPUs: slots go
    round-robin, so slots 0..gpus-1 are on distinct GPUs and any n_jobs slots put at most
    ``ceil(n_jobs / gpus)`` on one GPU."""
    if gpus < 1 or slot < 0:
        raise ValueError(f"gpu_of_slot: slot {slot} and gpus {gpus} must be >= 0 and >= 1")
    return slot % gpus


def jobs_per_gpu(n_jobs: int, *, gpus: int) -> int:
    """k: the most jobs one GPU runs at once when ``n_jobs`` workers share ``gpus`` GPUs (no GPU: all
    ``n_jobs`` on the CPU)."""
    return math.ceil(n_jobs / gpus) if gpus >= 1 else n_jobs


def spread(jobs: int, *, gpus: int, jobs_per_gpu: int) -> list[int]:
    """The GPU of each job of a batch of ``jobs`` launched in order with ``n_jobs = gpus * jobs_per_gpu``
    workers, jobs of equal length: job i runs in slot ``i mod n_jobs``, so on GPU ``i mod gpus``.
    (When lengths differ, a job waits for a free worker and runs on that worker's GPU: see
    ``lowest_free``; the bound of ``jobs_per_gpu`` at once per GPU holds either way.)"""
    if jobs_per_gpu < 1:
        raise ValueError(f"spread: jobs_per_gpu={jobs_per_gpu} must be >= 1")
    slots = gpus * jobs_per_gpu
    return [gpu_of_slot(i % slots, gpus=gpus) for i in range(jobs)]


def lowest_free(held: Iterable[int], *, slots: int) -> int | None:
    """The slot a new worker claims: the lowest of ``0..slots-1`` not in ``held``; None when all are held."""
    taken = set(held)
    return next((s for s in range(slots) if s not in taken), None)


# --- the launcher's slots, claimed by the worker processes -------------------------------------------

_held: dict[str, tuple[int, int]] = {}  # slots folder -> (slot, open fd holding its lock), for this process


def claim_slot(folder: Path, *, slots: int, wait_s: float = 60.0, poll_s: float = 0.2) -> int | None:
    """Claim the lowest free slot of ``0..slots-1`` in ``folder`` (an exclusive ``flock`` on
    ``folder/slot-<n>.lock``) for the rest of this process, and return it. The same process asking
    again gets the same slot; a process that exits (or dies) frees its slot. When every slot stays
    taken for ``wait_s`` (a worker of a resized pool still exiting), returns None."""
    key = str(Path(folder).resolve())
    if key in _held:
        return _held[key][0]
    Path(folder).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for slot in range(slots):
            fd = os.open(Path(folder) / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held[key] = (slot, fd)
            return slot
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def release_slots() -> None:
    """Free every slot this process holds (tests; a worker's slots are freed when it exits)."""
    for _slot, fd in _held.values():
        os.close(fd)
    _held.clear()


PROCESS.on_reset("devices.slots", release_slots)  # a process's slots end with it


def launcher_slots(hydra_cfg) -> int | None:
    """How many jobs the sweep's launcher runs at once, when it runs them side by side in worker
    processes of one machine (joblib: ``n_jobs``, -1 = all cores, -2 = all but one, as in joblib);
    None otherwise (one job at a time, submitit, SLURM: the job keeps the first visible GPU)."""
    mode = hydra_cfg.get("mode") if hydra_cfg is not None else None
    if getattr(mode, "name", str(mode)) != "MULTIRUN":
        return None
    launcher = hydra_cfg.get("launcher") or {}
    n_jobs = launcher.get("n_jobs")
    if "joblib" not in str(launcher.get("_target_", "")) or not isinstance(n_jobs, int) or n_jobs == 0:
        return None
    if n_jobs > 0:
        return n_jobs
    import joblib

    return max(1, joblib.cpu_count() + 1 + n_jobs)


def pick_gpu(*, gpus: int, hydra_cfg) -> int:
    """The GPU index for this job: with one GPU, or outside a parallel sweep, 0; in a worker of a
    parallel sweep (``launcher_slots``), the GPU of the worker's slot (``claim_slot`` in
    ``<hydra.sweep.dir>/.devices``), kept for every job of that worker. Logs the choice."""
    slots = launcher_slots(hydra_cfg)
    if gpus <= 1 or slots is None or slots <= 1:
        return 0
    folder = Path(str(hydra_cfg.runtime.get("cwd") or ".")) / str(hydra_cfg.sweep.dir) / SLOTS_FOLDER
    slot = claim_slot(folder, slots=slots)
    if slot is None:  # every slot held: spread by job number rather than pile onto GPU 0
        num = int(hydra_cfg.job.get("num") or 0)
        gpu = num % gpus
        log.warning("all %d launcher slots taken after 60 s: job %d goes to cuda:%d by its number", slots, num, gpu)
        return gpu
    gpu = gpu_of_slot(slot, gpus=gpus)
    log.info(
        "cuda:%d for this job: launcher slot %d of %d on %d GPUs (at most %d jobs per GPU at once)",
        gpu,
        slot,
        slots,
        gpus,
        jobs_per_gpu(slots, gpus=gpus),
    )
    return gpu


# --- the memory check ---------------------------------------------------------------------------------


def check_memory(*, job_bytes: int, jobs_per_gpu: int, free: list[int], n_jobs: int) -> str | None:
    """None when ``jobs_per_gpu`` jobs of ``job_bytes`` each fit in every GPU's ``free`` bytes; else the
    one-line warning (the GPU with the least free memory, and the n_jobs that fits there)."""
    need = jobs_per_gpu * job_bytes
    if not free or need <= min(free):
        return None
    least = min(range(len(free)), key=free.__getitem__)
    fits = max(0, free[least] // max(job_bytes, 1)) * len(free)
    advice = f"set hydra.launcher.n_jobs={fits}" if fits >= 1 else "free the GPU or use trainer.device=cpu"
    return (
        f"hydra.launcher.n_jobs={n_jobs}: {jobs_per_gpu} job{'s' if jobs_per_gpu != 1 else ''} per GPU need about {jobs_per_gpu} x "
        f"{job_bytes / GIB:.1f} GiB = {need / GIB:.1f} GiB, but cuda:{least} has {free[least] / GIB:.1f} GiB free; "
        f"{advice} (or a smaller trainer.batch_size)"
    )


def activation_values(model, *, crop_size: int) -> tuple[int, int]:
    """(sum, max) of the number of values each leaf module of ``model`` outputs for one image of
    ``crop_size`` px, traced on the meta device (no memory, no compute): the sum is what a training
    step keeps for backward, the max bounds an inference step's peak."""
    import torch

    sizes: list[int] = []

    def hook(_module, _inputs, output):
        outs = output if isinstance(output, (tuple, list)) else (output,)
        sizes.append(sum(o.numel() for o in outs if isinstance(o, torch.Tensor)))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, crop_size, crop_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)


def job_bytes(model, *, batch_size: int, crop_size: int, bf16: bool, trains_backbone: bool, bank_batch: int) -> int:
    """An estimate of one job's GPU memory: a CUDA context, the weights (fp32), gradients and
    optimizer state (8 bytes) of what trains, and the activations: a training step keeps every
    layer's output for ``batch_size`` images (bf16: 2 bytes a value, else 4); a frozen backbone only
    runs forward (two layer outputs at once), at the feature bank's ``bank_batch`` when that is larger.
    Not counted: a tile store kept on the GPU (``data.tile_store_device``)."""
    params = sum(p.numel() for p in model.parameters())
    trainable = params if trains_backbone else 0
    total, largest = activation_values(model, crop_size=crop_size)
    value = 2 if bf16 else 4
    if trains_backbone:
        activations = total * batch_size * value
    else:
        activations = 2 * largest * max(batch_size, bank_batch) * value
    return CONTEXT_BYTES + 4 * params + (4 + 8) * trainable + activations


def meta_backbone(name: str, **kwargs):
    """The torchvision model ``name`` built on the meta device (shapes only, instant, no weights)."""
    import torch
    from torchvision import models as tvm

    with torch.device("meta"):
        return tvm.get_model(name, weights=None, **kwargs)


def check_sweep_memory(cfg, hydra_cfg, *, gpus: int | None = None, free: list[int] | None = None) -> str | None:
    """Before a parallel sweep starts: warn in one line (and return it) when k = ceil(n_jobs / GPUs)
    jobs of this config would not fit in a GPU's free memory (``torch.cuda.mem_get_info``). Nothing
    to check (None) without CUDA, with ``trainer.device=cpu`` or outside a parallel joblib sweep.
    ``gpus`` and ``free`` default to the visible GPUs and their free bytes."""
    import torch

    slots = launcher_slots(hydra_cfg)
    if slots is None or str(cfg.trainer.device) == "cpu":
        return None
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 1:
        return None
    if str(cfg.trainer.device) not in ("auto", "cuda"):  # one named GPU takes every job
        gpus = 1
    if free is None:
        free = [torch.cuda.mem_get_info(i)[0] for i in range(gpus)]
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(cfg.backbone.model_kwargs, resolve=True)
    try:
        model = meta_backbone(str(cfg.backbone.name), **kwargs)
    except Exception as e:  # an unknown backbone is named by the job's own checks
        log.debug("no memory estimate for backbone %s: %s", cfg.backbone.name, e)
        return None
    bank = cfg.trainer.bank_batch_size or 256
    need = job_bytes(
        model,
        batch_size=int(cfg.trainer.batch_size),
        crop_size=int(cfg.backbone.crop_size),
        bf16=checks.precision(cfg.trainer.precision) is not False,  # auto: bf16 on the GPUs that have it
        trains_backbone=str(cfg.backbone.freeze) != "all",
        bank_batch=int(bank) if str(cfg.trainer.feature_bank) != "off" else 0,
    )
    message = check_memory(job_bytes=need, jobs_per_gpu=jobs_per_gpu(slots, gpus=gpus), free=free, n_jobs=slots)
    if message:
        log.warning(message)
    else:
        log.info(
            "%d jobs at once on %d GPU(s): %d per GPU, about %.1f GiB each",
            slots,
            gpus,
            jobs_per_gpu(slots, gpus=gpus),
            need / GIB,
        )
    return message
