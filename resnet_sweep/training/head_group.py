"""Jobs of a sweep that train heads on one feature bank, trained together (``trainer.batch_heads``).

Each job stays a job: the launcher runs every job of a group through Hydra's own ``run_job`` (its
folder, its config files, its callbacks, its MLflow run, its resume state), each in a thread of its
own. The threads take turns with the launcher's thread, never two at once: a job runs until its
head is ready to train (``Member.fit``), the launcher then trains one epoch of every waiting head in
one stacked pass (``head_stack.HeadStack``) and hands each job its epoch's metrics in turn, which
the job ends as it would alone (``engine.Fit.end_epoch``: scheduler, best state, resume state,
MLflow, Optuna's pruner). A job that stops (early stop, pruned, diverged, failed) leaves the stack
and goes on to its test metrics and checkpoint; the others train on.

At each turn a job gets back what is per job in this process: Hydra's config, the log handlers
that write its log file, and the random state (its dropout draws continue its own stream).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from resnet_sweep.config import checks
from resnet_sweep.core import faults
from resnet_sweep.core.errors import Diverged
from resnet_sweep.training import engine, features, models, optimizers, resume
from resnet_sweep.training.head_stack import Diverging, HeadSpec, HeadStack
from resnet_sweep.training.stacked_heads import default_generator, head_signature, optimizer_signature

log = logging.getLogger(__name__)

_here = threading.local()
HEAD = "resnet_sweep.training.models.Head"
OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")


def group_key(cfg) -> str | None:
    """Jobs with the same key can train together: heads only, on the same feature bank, device and
    tracking store. None for a job that trains alone (fine-tuning, ``trainer.batch_heads=off``,
    a head or optimizer without a stacked twin)."""
    if checks.batch_heads(cfg.trainer) != "auto" or not features.wanted(cfg):
        return None
    if cfg.head.get("_target_") != HEAD or cfg.optimizer.get("_target_") not in OPTIMIZERS:
        return None
    trainer = cfg.trainer
    shared = {
        "backbone": cfg.backbone,
        "data": cfg.data,
        "tracking": cfg.tracking,
        "bank": [trainer.bank_views, trainer.crop_seed, trainer.device, trainer.precision, trainer.get("resume_dir")],
    }
    return json.dumps(OmegaConf.to_container(OmegaConf.create(shared), resolve=True), sort_keys=True, default=str)


def partition(configs: list) -> list[list[int]]:
    """Indices of ``configs`` in groups (in order of their first job); a job that trains alone is a
    group of one."""
    groups: dict[str, list[int]] = {}
    out: list[list[int]] = []
    for i, cfg in enumerate(configs):
        key = group_key(cfg)
        if key is None:
            out.append([i])
        elif key in groups:
            groups[key].append(i)
        else:
            groups[key] = [i]
            out.append(groups[key])
    return out


def current() -> Member | None:
    """The group member running in this thread, or None (a job on its own)."""
    return getattr(_here, "member", None)


def wait_until(done: Callable[[], bool]) -> None:
    """Until ``done()``: in a group, the other jobs take their turns meanwhile (this job's turn
    comes back once it is done, or when nothing else is left to do); alone, nothing."""
    member = current()
    if member is None or done():
        return
    member.paused_on = done
    try:
        msg = member._wait()
    finally:
        member.paused_on = None
    if isinstance(msg, BaseException):
        raise msg


def build_classifier(backbone_cfg, head_cfg, *, seed: int, num_classes: int) -> models.Built:
    """``models.build_classifier``; in a group, the backbone is built once per (backbone, head, seed,
    classes) and shared by the members (frozen: nothing changes it), each member getting its own copy
    of the head as that seed initialises it."""
    member = current()
    if member is None:
        return models.build_classifier(backbone_cfg, head_cfg, seed=seed, num_classes=num_classes)
    key = json.dumps([OmegaConf.to_container(c, resolve=True) for c in (backbone_cfg, head_cfg)] + [seed, num_classes])
    cache = member.group.classifiers
    if key not in cache:
        cache[key] = models.build_classifier(backbone_cfg, head_cfg, seed=seed, num_classes=num_classes)
    built = cache[key]
    model = models.Classifier(built.model.backbone, copy.deepcopy(built.model.head))
    return dataclasses.replace(built, model=model)


class Member:
    """One job of a group: its thread, and its side of the turns (``fit``)."""

    def __init__(self, group: HeadGroup, run: Callable[[], object]):
        self.group, self.run = group, run
        self.go = threading.Event()
        self.inbox = None
        self.result, self.error = None, None
        self.waiting, self.ended = False, False
        self.spec: HeadSpec | None = None
        self.key: tuple | None = None
        self.epoch: int | None = None
        self.stack: HeadStack | None = None
        self.slot = -1
        self.device: torch.device | None = None
        self.paused_on: Callable[[], bool] | None = None  # wait_until's condition
        self._context = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    # ------------------------------------------------------------------ the job's thread
    def _main(self) -> None:
        _here.member = self
        self.go.wait()
        self.go.clear()
        try:
            self.result = self.run()
        except BaseException as e:  # handed to the launcher's thread, raised there
            self.error = e
        finally:
            self.ended = True
            self.group.back.set()

    def _wait(self):
        """Give the turn back to the launcher; return what it sends when it is this job's turn again."""
        self._save_context()
        self.waiting = True
        self.group.back.set()
        self.go.wait()
        self.go.clear()
        self.waiting = False
        self._restore_context()
        return self.inbox

    def _save_context(self) -> None:
        root = logging.getLogger()
        self._context = (HydraConfig.instance().cfg, list(root.handlers), root.level, resume.rng_state())

    def _restore_context(self) -> None:
        cfg, handlers, level, rng = self._context
        HydraConfig.instance().cfg = cfg
        root = logging.getLogger()
        root.handlers[:] = handlers
        root.setLevel(level)
        resume.set_rng_state(rng)

    def fit(self, model, splits, optimizer_cfg, trainer_cfg, log_epoch, objective: str, **kw) -> engine.History:
        """``engine.fit``'s contract, trained in the group's stacked pass where the head and its
        optimizer have a stacked twin (else alone, as ``engine.fit``)."""
        class_weight = kw.pop("class_weight", None)
        device = kw["device"]
        run = engine.start_fit(
            model, optimizer_cfg, trainer_cfg=trainer_cfg, log_epoch=log_epoch, objective=objective, **kw
        )
        if run.done:
            return run.history
        head, opt = head_signature(model.head), optimizer_signature(run.optimizer)
        if head is None or opt is None:
            return engine.train_alone(run, splits, trainer_cfg=trainer_cfg, device=device, class_weight=class_weight)
        generator = default_generator(device)
        self.spec = HeadSpec(
            head=model.head,
            optimizer=run.optimizer,
            train=splits.train,
            valid=splits.valid,
            num_classes=len(splits.classes),
            class_weight=class_weight,
            rng_state=generator.get_state(),
            groups=(splits.groups or {}).get("valid") if splits.groups else None,
            aggregate=splits.group_aggregate,
        )
        bank = (splits.train.features.filename, splits.train.batch_size, splits.sampler)
        self.key = (bank, head, opt, str(device), str(trainer_cfg.precision), len(splits.classes))
        self.device, self.epoch = device, run.start
        try:
            return self._train(run, model, generator)
        finally:
            self.epoch = None

    def _train(self, run: engine.Fit, model, generator) -> engine.History:
        while True:
            msg = self._wait()
            if isinstance(msg, BaseException):
                raise msg
            if isinstance(msg, Diverging):
                raise Diverged(str(msg))
            epoch = self.epoch
            self.stack.heads.copy_to(self.slot, model.head)
            self.stack.optimizer.store(self.slot, run.optimizer)
            generator.set_state(self.stack.rng[self.slot])
            lrs = optimizers.learning_rates(run.optimizer)
            stop = run.end_epoch(epoch, msg, lrs)
            self.stack.optimizer.set_lr(self.slot, run.optimizer.param_groups[0]["lr"])
            self.epoch = epoch + 1
            if stop or self.epoch > run.max_epochs:
                return run.history

    # ------------------------------------------------------------------ the launcher's thread
    def turn(self, message=None) -> None:
        """Let this job run (with ``message``) until it waits for its next epoch or ends."""
        self.inbox = message
        self.group.back.clear()
        self.go.set()
        self.group.back.wait()


class HeadGroup:
    """Runs the jobs of one group (``partition``): each ``run()`` is one job (Hydra's ``run_job``)."""

    def __init__(self) -> None:
        self.back = threading.Event()
        self.classifiers: dict[str, models.Built] = {}  # build_classifier's, for this group's members

    def run(self, jobs: list[Callable[[], object]]) -> list:
        """Each job's result, in order; a job's exception is re-raised here only if it is an
        interruption (KeyboardInterrupt), after every job has been stopped."""
        members = [Member(self, job) for job in jobs]
        launcher = Member(self, lambda: None)
        launcher._save_context()  # what the launcher's thread had: Hydra's config, the log handlers
        with faults.deferred(stop_after=False):  # a signal is taken at the next faults.check, between turns
            try:
                for m in members:
                    m.thread.start()
                    m.turn()
                    _stop_if_stopped(m)
                self._train([m for m in members if m.waiting])
            except BaseException as e:
                for m in members:
                    if m.waiting:
                        m.turn(e if isinstance(e, KeyboardInterrupt) else faults.Interrupted("an error"))
                raise
            finally:
                for m in members:
                    if m.thread.ident is not None:  # a job the group stopped before its start never ran
                        m.thread.join()
                launcher._restore_context()
        stopped = [m.error for m in members if isinstance(m.error, KeyboardInterrupt)]
        if stopped:
            raise stopped[0]
        for m in members:
            if m.error is not None:
                raise m.error
        return [m.result for m in members]

    def _train(self, members: list[Member]) -> None:
        stacks: dict[tuple, list[Member]] = {}
        for m in members:
            if m.epoch is not None:  # waiting for an epoch (else paused: wait_until)
                stacks.setdefault(m.key, []).append(m)
        built = []
        for group in stacks.values():
            stack = HeadStack([m.spec for m in group], device=group[0].device, precision=group[0].key[4])
            for slot, m in enumerate(group):
                m.stack, m.slot = stack, slot
            built.append((stack, group))
        log.info(
            "training %d heads together in %d stack(s) (trainer.batch_heads=auto)",
            sum(len(group) for group in stacks.values()),
            len(built),
        )
        passes, seconds = 0, 0.0
        while any(m.waiting for m in members):
            trained = False
            for stack, group in built:
                epochs = [m.epoch if m.waiting and m.paused_on is None else None for m in group]
                if all(e is None for e in epochs):
                    continue
                faults.check()
                start = time.perf_counter()
                results = stack.epoch(epochs)
                passes, seconds, trained = passes + 1, seconds + time.perf_counter() - start, True
                for m, result in zip(group, results, strict=True):
                    if result is not None:
                        faults.check()
                        m.turn(result)
                        _stop_if_stopped(m)
            _resume_paused(members, block=not trained)
        log.info("heads trained together: %d stacked epochs in %.2f s", passes, seconds)


def _resume_paused(members: list[Member], *, block: bool) -> None:
    """Give the turn back to the jobs whose ``wait_until`` is over; with ``block`` (nothing left to
    train), to the first paused job in any case: it waits there."""
    paused = [m for m in members if m.waiting and m.paused_on is not None]
    ready = [m for m in paused if m.paused_on()]
    for m in (ready or paused[:1]) if block else ready:
        faults.check()
        m.turn()
        _stop_if_stopped(m)


def _stop_if_stopped(member: Member) -> None:
    """A signal, or a job that stopped the sweep (``faults.Stopped``: a full disk, a store gone past
    its retry time), stops the whole group here: the others would hit the same wall."""
    faults.check()
    if isinstance(member.error, KeyboardInterrupt):
        raise member.error
