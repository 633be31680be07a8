"""Connecting to the MLflow store: one line when it does not answer, never a second run after a blip."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from resnet_sweep.core import faults
from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.core.redaction import redact


class StoreUnreachable(UserError):
    """The MLflow store did not answer: an infrastructure fault, not a mistake in the job."""


def connect(tracking_cfg) -> str:
    """Point MLflow at the store and experiment; fail in one line if unreachable. Returns the
    experiment id."""
    mlflow.set_tracking_uri(str(tracking_cfg.uri))
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update({k: v for k, v in quick.items() if saved[k] is None})
    try:
        with faults.quiet("urllib3.connectionpool"):  # its "Retrying (...)" line before ours
            _probe_database(str(tracking_cfg.uri))
            with _creation_lock(str(tracking_cfg.uri)):
                experiment = _set_experiment(str(tracking_cfg.experiment))
                tag_experiment_kind(experiment)
    except Exception as e:
        reason = redact(first_line(e))
        unwritable = _unwritable(str(tracking_cfg.uri), e)
        if unwritable:
            raise UserError(
                f"tracking.uri={redact(tracking_cfg.uri)}: cannot write here ({unwritable}: {reason}); "
                "run from a folder you can write to, or point tracking.uri at one"
            ) from None
        raise StoreUnreachable(
            f"tracking.uri={redact(tracking_cfg.uri)}: cannot reach the MLflow store ({reason}); "
            "check the URI or start the server"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    return experiment.experiment_id


def _unwritable(uri: str, e: BaseException) -> str | None:
    """The folder of a ``sqlite:///`` store where this process cannot write (read-only, no
    permission), when that is why connecting failed."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = Path(os.path.expanduser(uri[len("sqlite:///") :])).absolute().parent
    words = ("read-only file system", "readonly database", "permission denied", "unable to open database file")
    if any(w in str(e).lower() for w in words) and not os.access(folder if folder.exists() else folder.parent, os.W_OK):
        return str(folder)
    return None


DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # the stores MLflow keeps through SQLAlchemy


def database_of(uri: str) -> str | None:
    """The database a tracking URI names (``postgresql+psycopg://...`` -> ``postgresql``); None for
    a tracking server (``http://``) or a folder."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme if scheme in DATABASES else None


def _creation_lock(uri: str):
    """A SQLite store is created (tables, migrations) by the first process that opens it: two sweeps
    started at once in a new folder raced there ("Online migration expected to match one row").
    A file lock beside the database file makes the creation one process's job."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    path = Path(os.path.expanduser(uri[len("sqlite:///") :]))
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=300)


def _probe_database(uri: str) -> None:
    """A database URI (postgresql://, mysql://...) is tried once, quickly: MLflow itself retries an
    unreachable database for about 100 s before giving up."""
    scheme = database_of(uri)
    if scheme in (None, "sqlite"):
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    connect_args = {"connect_timeout": 10} if scheme in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _set_experiment(name: str):
    """``mlflow.set_experiment``; when parallel jobs or sweeps create the experiment at the same
    moment, the losers of the race use the winner's."""
    try:
        return mlflow.set_experiment(name)
    except Exception as e:
        if "already exist" not in str(e).lower() and "unique" not in str(e).lower():
            raise
        return mlflow.set_experiment(name)


# MLflow 3's UI opens an experiment tagged "genai_development" (or untagged, guessing) on its GenAI
# overview of traces; "custom_model_development" opens it on the runs table (mlflow/server/js:
# ExperimentKind). A tag the user set is left alone.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tag_experiment_kind(experiment) -> None:
    """Tag the experiment (new or existing) so that the MLflow UI opens on its runs."""
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


# The runs view every sweep prepares (shared_view), opened by ?viewStateShareKey=<key>; MLflow 3.17
# opens in its GenAI mode unless ?workflowType=machine_learning says otherwise (the browser keeps it).
VIEW_KEY = "resnet-sweep"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
MODEL_TRAINING = "workflowType=machine_learning"


def view_url(ui: str, experiment) -> str:
    """The experiment's runs page in Model-training mode, on its prepared view where it has one."""
    shared = f"&viewStateShareKey={VIEW_KEY}" if VIEW_TAG in (experiment.tags or {}) else ""
    return f"{ui}/#/experiments/{experiment.experiment_id}/runs?{MODEL_TRAINING}{shared}"


def runs_url(tracking_uri: str, experiment: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The URL of the experiment's runs page in the MLflow UI at ``ui`` (``view_url``; the experiment
    tagged on the way, for a store made before the tag existed); the UI's home page where the store
    has no such experiment yet."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return f"{ui}/  (no experiment '{experiment}' in {redact(tracking_uri)} yet: run a sweep first)"
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return view_url(ui, found)


def existing_run(run_id: str | None):
    """The run, or None where this store does not have it (another store, deleted). A store that does
    not answer raises: a blip must not start a second run of the same job."""
    if not run_id:
        return None
    try:
        return MlflowClient().get_run(run_id)
    except Exception as e:
        if faults.is_infrastructure(e):
            raise
        return None
