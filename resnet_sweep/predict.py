"""Predict with a run's model: probabilities for a folder of images, bad files listed, not fatal."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from . import data, models
from .errors import UserError
from .report import find_parent


def best_run(client: MlflowClient, experiment: str):
    """The best finished run of an experiment, by each run's own validation objective."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"--experiment {experiment}: no such experiment in {mlflow.get_tracking_uri()}")
    from .engine import direction

    runs = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=10000)
            if r.data.tags.get("sweep") != "true"]
    scored = []
    for r in runs:
        objective = r.data.tags.get("objective", "valid/loss")
        value = r.data.metrics.get(f"best/{objective}")
        if value is not None and math.isfinite(value):
            scored.append(((1 if direction(objective) == "minimize" else -1) * value, r))
    if not scored:
        raise UserError(f"experiment {experiment}: no finished run to predict with")
    return min(scored, key=lambda s: s[0])[1]


def load(client: MlflowClient, run, logged_model: bool = False) -> tuple[torch.nn.Module, dict]:
    """The run's model and its checkpoint's metadata (classes, normalisation, crop). By default the
    model is rebuilt from the run's checkpoint (``weights_only``, no pickled code; the frozen
    backbone is verified by checksum); ``logged_model=True`` unpickles the run's logged MLflow model
    instead (only for stores you trust)."""
    from .models import ProbabilityModel

    from .tracking import downloaded_checkpoint

    with downloaded_checkpoint(run) as path:
        if not logged_model:
            classifier, meta = models.load_checkpoint(path)
            return ProbabilityModel(classifier).eval(), meta
        meta = torch.load(path, map_location="cpu", weights_only=True)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    if not logged:
        raise UserError(f"run {run.info.run_id} ({run.info.run_name}) has no logged model; drop --logged-model")
    return mlflow.pytorch.load_model(logged[0].model_uri, map_location="cpu").eval(), meta


def predict(images_dir: str, run_id: str | None, best: bool, experiment: str, tracking_uri: str,
            out: str, batch_size: int = 32, logged_model: bool = False):
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    if best:
        run = best_run(client, experiment)
    elif run_id:
        try:
            run = client.get_run(run_id)
        except Exception:
            raise UserError(f"--run {run_id}: no such run in {tracking_uri}") from None
    else:
        parent = find_parent(client, experiment, None)
        run = client.get_run(parent.data.tags["best_run_id"])
    root = Path(images_dir)
    if not root.is_dir():
        raise UserError(f"{images_dir}: no such directory")
    model, meta = load(client, run, logged_model)
    transform = data.eval_transform(int(meta["crop_size"]), meta["mean"], meta["std"], meta.get("resize"))
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    bad: list[tuple[str, str]] = []
    rows: list[tuple[str, float, str]] = []
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush():
        if not batch:
            return
        with torch.inference_mode():
            probs = model(torch.stack([x for _, x in batch])).float().reshape(-1).tolist()
        for (p, _), prob in zip(batch, probs):
            rows.append((str(p), prob, meta["classes"][int(prob >= 0.5)]))
        batch.clear()

    for p in paths:
        try:
            image = data.load_rgb(p)
            if min(image.size) < int(meta["crop_size"]):
                raise ValueError(f"{image.size[0]}x{image.size[1]} is smaller than the {meta['crop_size']} crop")
            batch.append((p, transform(image)))
        except Exception as e:
            bad.append((str(p), str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        if len(batch) >= batch_size:
            flush()
    flush()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "probability", "label"])
        for path, prob, label in rows:
            writer.writerow([path, f"{prob:.6f}", label])
    return out_path, len(rows), bad, run
