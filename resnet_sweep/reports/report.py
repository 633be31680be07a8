"""A sweep's report, read from MLflow: its tables (``report_tables``: Markdown, and every run as CSV),
its figures (PNG) and its dashboard, written to a folder and logged to the sweep's parent run, whose
description it becomes."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.reports import dashboard
from resnet_sweep.reports.report_figures import acc_vs_lr_figure, curves_figure, metrics_vs_lr_figure
from resnet_sweep.reports.report_rows import to_row
from resnet_sweep.reports.report_tables import markdown
from resnet_sweep.tracking import plots
from resnet_sweep.tracking.hpo import find_study
from resnet_sweep.tracking.lookup import child_runs, find_parent
from resnet_sweep.tracking.store import MODEL_TRAINING, existing_run

log = logging.getLogger(__name__)


def write(
    tracking_uri: str, experiment: str | None, parent_id: str | None, out_dir: str | None, *, study=None
) -> tuple[str, Path]:
    """Build the report of a sweep, write it to ``out_dir`` and onto the parent run (with the sweep's
    dashboard, Optuna's plots in it when ``study`` is given). Returns the Markdown and the folder."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    parent = find_parent(client, experiment, parent_id)
    objective = parent.data.tags.get("objective", "valid/loss")
    children = child_runs(client, parent)
    rows = [to_row(r, objective) for r in children]
    if not rows:
        raise UserError(f"sweep {parent.info.run_name} ({parent.info.run_id}) has no child runs")
    text = markdown(rows, parent, objective)
    folder = Path(out_dir or Path("reports") / parent.info.run_name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(text)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    for r in sorted(rows, key=lambda r: (r.backbone, r.head, r.optimizer, r.lr, r.seed)):
        writer.writerow(asdict(r))
    (folder / "runs.csv").write_text(buffer.getvalue())
    for name, fig in (
        ("test_acc_vs_lr", acc_vs_lr_figure(rows)),
        ("acc_loss_vs_lr_by_optimizer", metrics_vs_lr_figure(rows)),
        ("learning_curves", curves_figure(client, rows, objective)),
    ):
        fig.savefig(folder / f"{name}.png", dpi=110)
        plots.close(fig)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != dashboard.FILE:
            client.log_artifact(parent.info.run_id, str(path), "report")
    if study is None and "optuna_study" in parent.data.tags:  # `resnet-sweep report` on a study's parent
        study = find_study(parent.data.tags["optuna_study"], parent.data.tags.get("storage"))
    write_dashboard(client, parent, children, folder, study=study)
    client.set_tag(parent.info.run_id, "mlflow.note.content", description(client.get_run(parent.info.run_id), text))
    return text, folder


def write_dashboard(client: MlflowClient, parent, children, folder: Path, *, study=None) -> None:
    """The sweep's dashboard (``dashboard.build``: its children and the runs it reused) beside the
    report and onto the parent run as ``dashboard.html``; one that cannot be made is a warning, the report stands without it."""
    reused = [r for r in map(existing_run, parent.data.tags.get("reused_run_ids", "").split(",")) if r is not None]
    try:
        page = dashboard.build(client, parent, children + reused, study=study)
    except Exception as e:
        log.warning("the sweep's dashboard was not made (%s)", first_line(e))
        return
    path = folder / dashboard.FILE
    path.write_text(page)
    client.log_artifact(parent.info.run_id, str(path))  # at the top of the run's artifacts, not in report/


def description(parent, text: str) -> str:
    """The parent run's description in the MLflow UI: its summary, a link to its best run, the
    report's tables."""
    tags = parent.data.tags
    head = []
    if "summary" in tags:
        head.append(f"**{tags['summary']}**")
    if "best_run_id" in tags:
        url = f"#/experiments/{parent.info.experiment_id}/runs/{tags['best_run_id']}?{MODEL_TRAINING}"
        head.append(f"Best run (on validation): [{tags.get('best_run_name', tags['best_run_id'])}]({url})")
    body = text.split("\n", 1)[1] if text.startswith("# ") else text  # the run's name is the page's title
    return "\n\n".join([*head, padded(body.strip())]) + "\n"


PAD = "&nbsp;&nbsp;"


def padded(markdown: str) -> str:
    """Table cells padded with non-breaking spaces: MLflow's Markdown viewer draws tables without
    any (``OptimizerLearning rate``)."""
    lines = []
    for line in markdown.splitlines():
        if line.startswith("|") and line.strip("|-: "):
            cells = line.strip().strip("|").split("|")
            line = "|" + "|".join(f"{PAD}{c.strip()}{PAD}" for c in cells) + "|"
        lines.append(line)
    return "\n".join(lines)
