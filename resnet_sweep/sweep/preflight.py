"""Pre-flight: every config mistake of a job or of every point of a sweep, found before anything is
created (one line, exit 2); then the store answers and the output folders are writable."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.types import RunMode

from resnet_sweep.config import checks
from resnet_sweep.core import faults
from resnet_sweep.core.errors import UserError, exit_with, first_line
from resnet_sweep.data import demo_data, grouping, image_folder
from resnet_sweep.tracking.store import connect
from resnet_sweep.training import hardware, models, optimizers

log = logging.getLogger(__name__)


def check_job(cfg) -> None:
    """Everything ``checks.check_config`` finds, ``trainer.device`` on this machine
    (``hardware.check_device``), and the optimizer and scheduler built once over a dummy parameter
    (``optimizers.check_optimizer``): run for every sweep point and again by each job."""
    checks.check_config(cfg)
    hardware.check_device(str(cfg.trainer.device))
    models.check_head(cfg.head)
    optimizers.check_optimizer(cfg.optimizer, cfg.scheduler if "scheduler" in cfg else None)


def check_against_data(cfg, listings: dict) -> None:
    """What only the data can tell, found before any run exists: ``loss.class_weight`` has one weight
    per class folder; ``data.group`` matches every file and gives each group one class. Lists a
    user's folder (once per root: ``listings``) only when one of the two is set; the demo's classes
    and files are known from its config, generated or not (``demo_data.planned_files``)."""
    weights = checks.class_weight(cfg.loss)
    if not isinstance(weights, list) and cfg.data.group is None:
        return
    if cfg.data.kind == "demo":
        classes = list(demo_data.classes_of(cfg.data))
        if cfg.data.group is not None:
            grouping.file_groups(*demo_data.planned_files(cfg.data), str(cfg.data.group))
    else:
        root = checks.check_root(cfg.data)
        if root not in listings:
            listings[root] = image_folder.list_tree(root)
        classes = listings[root].classes
        if cfg.data.group is not None:
            grouping.file_groups(root, listings[root].files, str(cfg.data.group))
    if isinstance(weights, list) and len(weights) != len(classes):
        raise UserError(
            f"loss.class_weight={weights}: {len(weights)} weight(s) for {len(classes)} classes "
            f"({', '.join(classes)}); give one per class folder, in this order"
        )


def check_sweep(config, every_point: bool = False) -> None:
    """Config mistakes, found before anything is created (no mlflow.db, no run): one line, exit 2.
    ``every_point`` (a sweep): every value of every swept key is checked, each composed with the
    others' first; an Optuna study's search space by its choices and each interval's two ends."""
    listings: dict = {}
    try:
        if every_point:
            for job_overrides in sweep_points(config):
                problem = checks.override_error(job_overrides)  # what Hydra would refuse composing it
                if problem:
                    raise UserError(problem)
                job = _compose_job(config, job_overrides)
                check_job(job)
                check_against_data(job, listings)
        else:
            check_job(config)
            check_against_data(config, listings)
    except UserError as e:
        exit_with(str(e), code=2)


def sweep_points(config) -> list[list[str]]:
    """Job override lists that together try every value of every swept key once: the command line's,
    a preset's ``hydra.sweeper.params`` (an Optuna search space's too) and, with
    ``hydra/sweeper=grids``, each of its grids."""
    sweeper = config.hydra.sweeper
    common = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    grids = [[f"{k}={v}" for k, v in grid.items()] for grid in (sweeper.get("grids") or [])] or [[]]
    task = list(config.hydra.overrides.task)  # last: it wins over a preset's, as in Hydra's sweeper
    return [point for grid in grids for point in _points(common + grid + task)]


def _points(lines: list[str]) -> list[list[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(lines)
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    swept = [(o.get_key_element(), _values(o)) for o in overrides if o.is_sweep_override()]
    first = [f"{k}={v[0]}" for k, v in swept if v]
    points = [fixed + first]
    for i, (key, values) in enumerate(swept):
        for value in values[1:]:
            points.append(fixed + first[:i] + [f"{key}={value}"] + first[i + 1 :])
    return points


def _values(override) -> list[str]:
    """The values a swept key takes, as override text: every one of a choice or range, the two ends of
    an Optuna interval (``tag(log, interval(1e-6, 1e-2))``: a range check holds between them)."""
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        return [str(sweep.start), str(sweep.end)]
    return list(override.sweep_string_iterator())


def _compose_job(config, job_overrides: list[str]):
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().config_loader().load_sweep_config(config, job_overrides)


def check_store_and_folders(config) -> str:
    """Before any training: the MLflow store answers and the output folders are writable; else one
    line and a non-zero exit. Returns the experiment id."""
    try:
        experiment_id = connect(config.tracking)
        hc = config.hydra
        check_writable(
            Path(str(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)),
            "hydra.sweep.dir" if hc.mode == RunMode.MULTIRUN else "hydra.run.dir",
        )
        check_writable(Path(os.path.expanduser(str(config.trainer.resume_dir))), "trainer.resume_dir")
        check_writable(Path(os.path.expanduser(str(config.data.cache_dir))), "data.cache_dir")
    except UserError as e:
        exit_with(str(e))
    return experiment_id


def is_study(config) -> bool:
    """An Optuna sweep (our sweeper), as opposed to Hydra's grid."""
    return str(config.hydra.sweeper.get("_target_", "")).startswith("hydra_plugins.resnet_sweep_optuna")


def check_writable(folder: Path, what: str) -> None:
    """``folder`` exists (made if need be) and this process can write there; else one line naming ``what``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"{what}={folder}: not writable ({e.strerror or e}); choose a folder you can write to"
        ) from None


def share_sweep_data(config) -> None:
    """What depends only on the data, done once for the whole sweep before its first job: the sweep's
    share folder (``shared_tree.start_sweep_share``), and the first point's data listed, stamped and checked
    into it (each image decoded once, for the check and the tile store together). Its jobs read that
    record instead of listing, stat-ing and checking every file again. A problem with the data is
    left to the jobs, each reporting it in its one line as before."""
    from resnet_sweep.data import loading, shared_tree

    share = shared_tree.start_sweep_share(Path(str(config.hydra.sweep.dir)))
    try:
        job = config if is_study(config) else _compose_job(config, sweep_points(config)[0])
        resize = job.backbone.resize
        smallest = int(job.backbone.crop_size) if not resize else 1
        shared_tree.share_tree(share, job.data, loading.resolve_root(job.data), crop_size=smallest, resize=resize)
    except UserError:
        pass
    except Exception as e:  # the jobs do it themselves then
        if faults.is_disk_full(e):  # before any job or run exists: the sweep stops here, exit 75
            message = f"the sweep's data interrupted: {first_line(e)}; free space there, then re-run the same command to resume"
            raise faults.stop_sweep(message) from None
        log.warning("the sweep's data was not prepared before its jobs (%s); its first job does it", first_line(e))
