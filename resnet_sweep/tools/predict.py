"""Predict with a run's model: probabilities for a folder of images, bad files listed, not fatal."""

from __future__ import annotations

import csv
import os
import secrets
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from resnet_sweep.config.checks import GROUP_AGGREGATES
from resnet_sweep.core.errors import UserError, first_line
from resnet_sweep.data import crops
from resnet_sweep.data.grouping import compile_group, group_key
from resnet_sweep.data.images import load_rgb
from resnet_sweep.tracking import lookup
from resnet_sweep.tracking.lookup import find_parent
from resnet_sweep.training import metrics, models


def best_run(client: MlflowClient, experiment: str):
    """The best finished run of an experiment, by each run's own validation objective."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"--experiment {experiment}: no such experiment in {mlflow.get_tracking_uri()}")
    runs = [
        r
        for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=10000)
        if r.data.tags.get("sweep") != "true"
    ]
    best = lookup.best_run(runs)
    if best is None:
        raise UserError(f"experiment {experiment}: no finished run to predict with")
    return best


def load(client: MlflowClient, run, logged_model: bool = False) -> tuple[torch.nn.Module, dict]:
    """The run's model and its checkpoint's metadata (classes, normalisation, crop). By default the
    model is rebuilt from the run's checkpoint (``weights_only``, no pickled code; the frozen
    backbone is verified by checksum); ``logged_model=True`` unpickles the run's logged MLflow model
    instead (only for stores you trust)."""
    from resnet_sweep.training.models import ProbabilityModel

    with lookup.downloaded_checkpoint(run) as path:
        if not logged_model:
            classifier, meta = models.load_checkpoint(path)
            return ProbabilityModel(classifier).eval(), meta
        meta = torch.load(path, map_location="cpu", weights_only=True)
    logged = lookup.logged_models(run)
    if not logged:
        raise UserError(f"run {run.info.run_id} ({run.info.run_name}) has no logged model; drop --logged-model")
    return mlflow.pytorch.load_model(logged[0].model_uri, map_location="cpu").eval(), meta


def predict(
    images_dir: str,
    run_id: str | None,
    best: bool,
    experiment: str,
    tracking_uri: str,
    out: str,
    batch_size: int = 32,
    logged_model: bool = False,
    group: str | None = None,
    aggregate: str = "mean",
):
    """Probabilities for the images under ``images_dir`` -> ``out``; with ``group``, also one row per
    group (slide, patient) -> ``<out stem>_groups.csv``."""
    root = Path(images_dir)
    if not root.is_dir():
        raise UserError(f"{images_dir}: no such directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise UserError(
            f"{images_dir}: no images in this folder (hidden files are ignored); give the folder "
            f"holding the images to predict; {out} was not written"
        )
    if aggregate not in GROUP_AGGREGATES:
        raise UserError(f"--aggregate {aggregate}: choose mean or majority")
    keys = groups_of(root, paths, group) if group else None  # a file the regex misses: before any work
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
    model, meta = load(client, run, logged_model)
    transform = crops.eval_transform(int(meta["crop_size"]), meta["mean"], meta["std"], meta.get("resize"))
    bad: list[tuple[str, str]] = []
    rows: list[tuple] = []  # (path, P(second class) | [P(class) per class], predicted class)
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush():
        if not batch:
            return
        with torch.inference_mode():
            out = model(torch.stack([x for _, x in batch])).float()
        if out.dim() == 2 and out.shape[1] > 1:  # three or more classes: one probability per class
            for (p, _), probs in zip(batch, out.tolist()):
                rows.append((str(p), probs, meta["classes"][max(range(len(probs)), key=probs.__getitem__)]))
        else:
            for (p, _), prob in zip(batch, out.reshape(-1).tolist()):
                rows.append((str(p), prob, meta["classes"][int(prob >= 0.5)]))
        batch.clear()

    for p in paths:
        try:
            image = load_rgb(p)
            if not meta.get("resize") and min(image.size) < int(meta["crop_size"]):  # resized: any size crops
                raise ValueError(f"{image.size[0]}x{image.size[1]} is smaller than the {meta['crop_size']} crop")
            batch.append((p, transform(image)))
        except Exception as e:
            bad.append((str(p), first_line(e)))
            continue
        if len(batch) >= batch_size:
            flush()
    flush()
    if not rows:
        path, why = bad[0]
        raise UserError(
            f"{images_dir}: none of its {len(bad)} file(s) could be read as an image (e.g. {path}: "
            f"{why}); fix them or give the folder holding the images to predict; {out} was not written"
        )
    out_path = Path(out)
    write_csv(out_path, rows, meta["classes"])
    if keys is not None:
        classes = meta["classes"]
        header = ["group", "tiles", *(f"p_{c}" for c in classes), "predicted"]
        groups_path = out_path.with_name(f"{out_path.stem}_groups.csv")
        write_csv(groups_path, [], table=(header, group_rows(rows, keys, classes, aggregate)))
    return out_path, len(rows), bad, run


def groups_of(root: Path, paths: list[Path], regex: str) -> dict[str, str]:
    """``--group REGEX``: each file's group (``split --group``'s rule, on the path below the folder
    given); a file it does not match is one line naming it."""
    pattern = compile_group(regex)
    return {str(p): group_key(p, p.relative_to(root).as_posix(), pattern, f"--group '{regex}'") for p in paths}


def group_rows(rows: list[tuple], keys: dict[str, str], classes: list[str], aggregate: str = "mean") -> list[list]:
    """One row per group: group, tiles, its score per class and predicted class, by training's rule
    (``metrics.group_scores``: mean probability, or share of tile votes with ``majority``)."""
    probs = torch.tensor([prob for _, prob, _ in rows], dtype=torch.float64)
    groups = [keys[path] for path, _, _ in rows]
    return [
        [key, len(idx), *(f"{s:.6f}" for s in score.tolist()), classes[predicted]]
        for key, idx, score, predicted in metrics.group_scores(probs, groups, len(classes), aggregate)
    ]


def write_csv(out_path: Path, rows: list[tuple], classes: list[str] | None = None, table=None) -> None:
    """path,probability,label (two classes: P(second class)), or path,p_<class>...,label (one
    probability column per class, three or more) to ``out_path``; or ``table`` (header, rows) as it
    is. Whole or not at all: written beside it under a temporary
    name and renamed over it, so an interrupted or failed write leaves the earlier file as it was. The
    new file gets the ordinary mode (0666 less the umask)."""
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", newline="") as f:
            writer = csv.writer(f)
            if table is not None:
                writer.writerow(table[0])
                writer.writerows(table[1])
            else:
                multi = bool(rows) and isinstance(rows[0][1], list)
                writer.writerow(["path", *([f"p_{c}" for c in classes] if multi else ["probability"]), "label"])
                for path, prob, label in rows:
                    writer.writerow([path, *(f"{p:.6f}" for p in (prob if multi else [prob])), label])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except OSError as e:
        raise UserError(
            f"--out {out_path}: cannot write it ({e.strerror or e}); {out_path} is left as it was; "
            "choose another --out or free some space"
        ) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
