"""The experiment's prepared runs view in the MLflow UI and its runs' colours, refreshed at the end of
every sweep: the ``mlflow.sharedViewState.<key>`` experiment tag (which columns, how wide, sorted on
what) that ``?viewStateShareKey=<key>`` opens, and a ``mlflow.runColor`` tag per child from a colour
map over the main swept value."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from resnet_sweep.config import objective as objectives
from resnet_sweep.reports.swept import OPTIMIZER_TAG, colour, main_key, swept_keys
from resnet_sweep.tracking.store import VIEW_TAG

RUN_COLOR_TAG = "mlflow.runColor"
RUN_NAME = "attributes.`Run Name`"


def _column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it: ``metrics.`test/acc```."""
    return f"{kind}.`{key}`"


def view_state(runs, objective: str) -> dict:
    """The runs table's state: the full run names, the swept keys, the objective at its best epoch,
    valid and test accuracy and loss, the best epoch; sorted on the objective, best first."""
    keys = swept_keys(runs)
    columns = [_column("tags" if k.name == OPTIMIZER_TAG else "params", k.name) for k in keys]
    metrics = [f"best/{objective}", "best/valid/acc", "best/valid/loss", "test/acc", "test/loss", "best_epoch"]
    columns += [_column("metrics", m) for m in dict.fromkeys(metrics)]
    columns += [_column("attributes", "Models"), _column("attributes", "Dataset")]
    longest = max((len(r.info.run_name or "") for r in runs), default=20)
    return {
        "selectedColumns": columns,
        "columnOrder": [RUN_NAME, *columns],
        "columnWidths": {RUN_NAME: min(max(180, 8 * longest + 60), 520)},
        "orderByKey": _column("metrics", f"best/{objective}"),
        "orderByAsc": objectives.direction(objective) == "minimize",
        "runListHidden": False,
        "viewMaximized": False,
    }


def refresh(client: MlflowClient, parent, children) -> None:
    """The experiment's view tag made from this sweep's children, and each child's colour."""
    objective = parent.data.tags.get("objective", "valid/loss")
    finished = [r for r in children if r.info.status == "FINISHED"] or children
    if not finished:
        return
    state = view_state(finished, objective)
    client.set_experiment_tag(parent.info.experiment_id, VIEW_TAG, json.dumps(state))
    main = main_key(swept_keys(finished))
    for run in children:
        if main is not None and run.info.run_id in main.values:
            client.set_tag(run.info.run_id, RUN_COLOR_TAG, colour(main, run.info.run_id))
