"""What a job writes to its MLflow run (``JobLog``): params, tags, per-epoch metrics (queued, written
at most every ``METRICS_EVERY_S``), test metrics, figures, checkpoint, model.

Metric names: ``train/loss train/acc valid/loss valid/acc`` with ``step=epoch`` from epoch 0;
``best_epoch``; ``test/loss test/acc test/auroc test/f1 test/balanced_acc``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from resnet_sweep.config.naming import optimizer_name, run_name, what_trains
from resnet_sweep.core import faults
from resnet_sweep.core.redaction import redact
from resnet_sweep.tracking import drawing
from resnet_sweep.tracking.logged import class_counts, dataset_input, group_csv, log_curves, log_model
from resnet_sweep.tracking.store import database_of
from resnet_sweep.training import head_group

log = logging.getLogger(__name__)

# A run's epochs reach MLflow at most this long after they end, in one write: heads trained together
# end an epoch every few milliseconds, and each write is a database transaction. Every epoch is in
# the resume state as it ends; a run killed before its write gets it from the attempt that resumes it.
METRICS_EVERY_S = 10.0


def rounded(metrics: dict) -> dict:
    """Metric values to 6 significant digits: what they mean, without float32 noise
    (``0.77499997`` -> ``0.775``); 6 digits keep every accuracy of up to a million images exact."""
    return {k: float(f"{float(v):.6g}") for k, v in metrics.items()}


class JobLog:
    """What a job writes to its MLflow run. Every call is retried for ``tracking.retry_s`` seconds
    when the store does not answer (a restarting server or database), then raises.

    On a database store (``sqlite:``, ``postgresql:``...) each attempt finishes before a SIGTERM or
    Ctrl-C stops the job (``faults.deferred``; the training loop's next ``faults.check`` stops it):
    an exception raised inside SQLAlchemy mid-write can leave this process's connection in an open
    transaction that holds the database's lock, which the clean-up marking the runs KILLED then waits
    on. (Once in CI a sweep SIGTERM'd right after an epoch, when it writes to MLflow, printed its last
    line and did not exit within 60 s; this is the likely cause, not reproduced in 12 tries.) Over
    HTTP an attempt may be cut: the server holds no lock for it."""

    def __init__(self, cfg, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.name = run_name(cfg)
        self.retry_s = float(cfg.tracking.retry_s)
        self.best_epoch = 0  # the step that the best epoch's single values and the model are logged at
        self.database = database_of(mlflow.get_tracking_uri()) is not None
        self.skipped: int | None = None  # data/skipped_images, logged after the first epoch's metrics
        self.weights_source = ""  # the tag, for the description's random-weights warning
        self.pending: list[Metric] = []  # metrics not written yet, in the order they were logged
        self.pending_tags: dict[str, str] = {}
        self.written_at = time.monotonic()
        self.figures: dict[str, drawing.Drawing] = {}  # artifact path -> the figure being drawn

    def _call(self, what: str, fn, *args, **kwargs):
        def attempt():
            if not self.database:
                return fn(*args, **kwargs)
            # MLflow logs a failed statement with its traceback before raising: retrying says it in one line
            with faults.deferred(stop_after=False), faults.quiet("mlflow.store.db.utils"):
                return fn(*args, **kwargs)

        return faults.retrying(attempt, self.retry_s, f"MLflow {what} ({self.name})")

    def _metrics(self, metrics: dict, step: int) -> None:
        """``metrics`` at ``step``, stamped now, queued for the next ``write``."""
        stamp = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), stamp, step) for key, value in metrics.items()]

    def write(self) -> None:
        """What is queued (metrics, tags) in one write. Each metric keeps the timestamp it was queued
        with: when a write reached the store but its answer was lost (a server killed or timing out
        mid-request), the retry sends the same rows, which MLflow's SQL store ignores, instead of
        logging the values a second time."""
        if self.pending or self.pending_tags:
            tags = [RunTag(k, v) for k, v in self.pending_tags.items()]
            self._call("log_batch", MlflowClient().log_batch, self.run_id, metrics=self.pending, tags=tags)
        self.pending, self.pending_tags, self.written_at = [], {}, time.monotonic()

    def tags(self, *, later: bool = False, **tags) -> None:
        """Set ``tags`` now, or with the next ``write`` (``later``)."""
        if "weights_source" in tags:
            self.weights_source = str(tags["weights_source"])
        tags = {k: redact(v) for k, v in tags.items()}
        if later:
            self.pending_tags.update({k: str(v) for k, v in tags.items()})
        else:
            self._call("set_tags", mlflow.set_tags, tags)

    @functools.cached_property
    def artifacts(self) -> str | None:
        """The run's artifact folder, where it is a local one."""
        return local_artifacts()

    def params(self, params: dict) -> None:
        self._call("log_params", mlflow.log_params, params)

    def epoch(self, epoch: int, metrics: dict) -> None:
        """The epoch's metrics, the objective first: MLflow's compare view plots a run's first metric
        by default."""
        first = {k: metrics[k] for k in (self.cfg.objective,) if k in metrics}
        self._metrics(rounded({**first, **metrics}), epoch)
        if self.skipped is not None:
            self._metrics({"data/skipped_images": self.skipped}, 0)
            self.skipped = None
        if time.monotonic() - self.written_at >= METRICS_EVERY_S:
            self.write()

    def skipped_images(self, skipped: list) -> None:
        """data.on_bad_image=skip: how many files were left out (a metric, logged after the first
        epoch's), and which."""
        self.skipped = len(skipped)
        if skipped:
            self._call(
                "log_dict",
                mlflow.log_dict,
                {"skipped": [{"path": p, "reason": r} for p, r in skipped]},
                "skipped_images.json",
            )

    def ensure_logged(self, epochs: list[dict]) -> None:
        """After a resume: log the epochs the interrupted attempt saved but did not log."""
        logged = {
            m.step
            for m in self._call("get_metric_history", MlflowClient().get_metric_history, self.run_id, "valid/loss")
        }
        for epoch, metrics in enumerate(epochs):
            if epoch not in logged:
                self.epoch(epoch, metrics)

    def history(self, history) -> None:
        best = history.best_metrics()
        self.best_epoch = history.best_epoch
        self.fit_summary = (
            f"best epoch {history.best_epoch} of {len(history.epochs) - 1}"
            + (" (stopped early)" if history.stopped_early else "")
            + f": {self.cfg.objective} {best.get(self.cfg.objective, float('nan')):.4g}"
        )
        # at the best epoch's step: the model logged at that step is linked to them (and to the
        # epoch's own train/valid values), not to the untrained epoch 0
        self._metrics(
            rounded(
                {
                    "best_epoch": history.best_epoch,
                    "epochs_run": len(history.epochs) - 1,
                    **{f"best/{k}": v for k, v in best.items() if not k.startswith("lr/")},
                }
            ),
            self.best_epoch,
        )
        never = history.best_epoch == 0 and len(history.epochs) > 1
        self.tags(later=True, stopped_early=str(history.stopped_early).lower(), never_improved=str(never).lower())
        if never:
            log.warning(
                "%s never improved on its untrained epoch 0 (%s); its test figures are the untrained "
                "head's: flagged never_improved=true, left out of the sweep's best run",
                self.name,
                self.cfg.objective,
            )
        self.draw("plots/learning_curves.png", "learning_curves", (history.epochs, history.best_epoch, self.name))

    def test_metrics(self, metrics: dict, classes: list[str]) -> dict:
        metrics = dict(metrics)
        matrix = metrics.pop("confusion_matrix")
        group_rows = metrics.pop("group_rows", None)
        metrics = rounded(metrics)
        if group_rows is not None:
            self._call("log_text", mlflow.log_text, group_csv(group_rows, classes), "test_groups.csv")
        self._metrics(metrics, self.best_epoch)
        self.tags(later=True, **{"mlflow.note.content": self.description(metrics)})
        self.write()
        self._call(
            "log_dict",
            mlflow.log_dict,
            {"classes": classes, "matrix (rows: true, cols: predicted)": matrix},
            "confusion_matrix.json",
        )
        self.draw("plots/confusion_matrix.png", "confusion_matrix", (matrix, classes, f"{self.name}: test"), dpi=150)
        return metrics

    def draw(self, path: str, kind: str, args: tuple, *, dpi: float = 100) -> None:
        """``plots.<kind>(*args)``, logged at ``path`` by ``log_figures``; in a group of jobs, drawn
        by a worker process meanwhile."""
        self.figures[path] = drawing.Drawing(kind, args, dpi=dpi, background=head_group.current() is not None)

    def log_figures(self) -> None:
        """The figures ``draw`` started, once drawn (in a group, the other jobs go on meanwhile)."""
        for path, figure in self.figures.items():
            head_group.wait_until(figure.done)
            png = figure.png()
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / Path(path).name
                file.write_bytes(png)
                with faults.writing(self.artifacts or tmp, need=3 * len(png)):
                    self._call("log_artifact", mlflow.log_artifact, str(file), str(Path(path).parent))
                    if figure.kind == "learning_curves":  # its loss panel: the run page's first chart
                        self._call("log_image", log_curves, figure.panel(0), step=self.best_epoch)
        self.figures = {}

    def description(self, test: dict) -> str:
        """The run's description in the UI (``mlflow.note.content``): what ran, its best epoch, its
        test figures."""
        cfg = self.cfg
        trains = what_trains(cfg.backbone).description
        figures = ", ".join(
            f"{label} {test[key]:.3f}"
            for key, label in (
                ("test/acc", "acc"),
                ("test/auroc", "AUROC"),
                ("test/f1", "F1"),
                ("test/balanced_acc", "balanced acc"),
            )
            if key in test
        )
        warning = (
            f"**Backbone weights: {self.weights_source}. Not transfer learning: this run started from random "
            "weights.**\n\n"
            if self.weights_source.startswith("random")
            else ""
        )
        return warning + (
            f"**{self.name}**: {cfg.backbone.name} with a {cfg.head.name} head, {optimizer_name(cfg.optimizer)} at "
            f"lr {float(cfg.optimizer.lr):g}, trains {trains}, seed {cfg.seed}.\n\n"
            f"{getattr(self, 'fit_summary', '')}.\n\n"
            f"Test (best epoch's weights): {figures}."
        )

    def dataset(self, splits, data_cfg) -> None:
        """The data set as the run's input (the runs table's *Dataset* column and filter): named
        after the root (``demo`` for the embedded data), its digest the file list's (paths and
        labels), its source the root, per-split class counts as the input's tags."""
        self._call(
            "log_input",
            mlflow.log_input,
            dataset_input(splits, data_cfg),
            context="training",
            tags=class_counts(splits),
        )

    def checkpoint(self, ckpt: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "best.pt"
            torch.save(ckpt, path)
            with faults.writing(self.artifacts or tmp, need=path.stat().st_size):
                self._call("log_artifact", mlflow.log_artifact, str(path), "checkpoint")

    def model(self, classifier, ckpt: dict) -> None:
        self._call("log_model", log_model, classifier, ckpt, self.name)


def local_artifacts() -> str | None:
    """The active run's artifact folder, where it is a local one."""
    with contextlib.suppress(Exception):
        active = mlflow.active_run()
        artifacts = active.info.artifact_uri if active else ""  # known since the run started: no query
        if artifacts.startswith("file:") or (artifacts and "://" not in artifacts):
            return artifacts.removeprefix("file://").removeprefix("file:")
    return None
