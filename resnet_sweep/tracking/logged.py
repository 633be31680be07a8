"""What a job's run holds besides its metrics: the data set it read (an MLflow dataset input of
metadata only, its class counts), the test split's groups as a CSV, the loss curves as the run
page's first chart, and the full model (the pytorch flavor), named after the run, described, its test
metrics linked to the data set."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from resnet_sweep.config.checks import SPLITS
from resnet_sweep.data import loading


def model_name(run_name: str) -> str:
    """The logged model's name: the run's, in the characters MLflow allows (no ``. / : % ' "``)."""
    return "".join("p" if c == "." else "_" if c in "/:%'\"" else c for c in run_name)


def group_csv(rows: list[dict], classes: list[str]) -> str:
    """The test split's groups (``data.group``): group, true class, tiles, the group's score per class
    (mean probability, or share of tile votes), predicted class."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["group", "class", "tiles", *(f"p_{c}" for c in classes), "predicted"])
    for r in rows:
        scores = [f"{s:.6f}" for s in r["scores"]]
        writer.writerow([r["group"], classes[r["class"]], r["tiles"], *scores, classes[r["predicted"]]])
    return out.getvalue()


def class_counts(splits) -> dict[str, str]:
    """``{"train": "a_class 6, b_class 6", ...}``: images per class of each split (a run's tags)."""
    return {
        split: ", ".join(f"{c} {n}" for c, n in zip(splits.classes, counts))
        for split, counts in loading.class_counts(splits).items()
    }


def dataset_input(splits, data_cfg):
    """An MLflow dataset of metadata only (the images stay where they are)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    root = Path(splits.root)
    digest = _digest(splits, root)
    with warnings.catch_warnings():  # two local-path source types match a folder; they are the same
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(root))
    name = "demo" if str(data_cfg.get("kind")) == "demo" else root.name
    return MetaDataset(source=source, name=name, digest=digest)


def _digest(splits, root: Path) -> str:
    """The data set's digest: its files (relative to the root) and labels; computed once per sweep when
    the splits hold the listed tree whole (``loading.Splits.listing``, shared by the sweep's jobs)."""
    listing, files = getattr(splits, "listing", None), getattr(splits, "files", None)
    whole = listing is not None and files is not None and all(files[s] is listing.files[s] for s in SPLITS)
    if whole and "dataset" in listing.fingerprints:
        return listing.fingerprints["dataset"]
    names = sorted(
        f"{split}/{below(path, folder)}\t{label}"
        for split, folder in ((split, root / split) for split in SPLITS)
        for path, label in getattr(splits, split).dataset.samples
    )
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    if whole:
        listing.fingerprints["dataset"] = digest
    return digest


def below(path, folder: Path) -> str:
    """``path`` relative to ``folder``, with forward slashes: by its text when it starts with the folder
    (as the loaders' files do: pathlib's ``relative_to`` costs some 50x more, for every file of every job)."""
    text, prefix = str(path), f"{folder}{os.sep}"
    if text.startswith(prefix):
        return text[len(prefix) :].replace(os.sep, "/")
    return Path(path).relative_to(folder).as_posix()


# The train and valid loss per epoch as an image chart: MLflow 3.17's run page (Model metrics tab)
# groups its charts in sections named by the key before its last "/", sorted by name (String.sort,
# then localeCompare as charts arrive), "Model metrics" last; "All epochs" sorts before best/, data/,
# lr/, test/, train/, valid/. Its chart shows log_image's copy scaled to 256 pixels: one panel, not two.
CURVES_KEY = "All epochs/train and valid loss"
DESCRIPTION_TAG = "mlflow.note.content"  # a logged model's description on its page, as a run's


def log_curves(image, *, step: int) -> None:
    """The loss panel of ``plots.learning_curves`` (a PIL image, ``drawing.Drawing.panel(0)``) as the
    active run's image ``CURVES_KEY`` at ``step``: the first chart of the run page's Model metrics
    tab. (MLflow's own line charts, one per metric, cannot be combined or reordered from the store:
    that layout lives in the browser's local storage.)"""
    mlflow.log_image(image, key=CURVES_KEY, step=step, synchronous=True)


def model_description(ckpt: dict, run_name: str) -> str:
    """The logged model's description (Markdown): which run and epoch, what goes in and comes out,
    a loud line first when the backbone started from random weights."""
    classes = list(ckpt["classes"])
    crop = int(ckpt["crop_size"])
    backbone, head = (ckpt.get(k, {}).get("name", "?") for k in ("backbone", "head"))
    weights = str(ckpt.get("weights_source", ""))
    out = (
        f"P({classes[1]}), one float per image (classes {classes[0]}, {classes[1]})"
        if len(classes) == 2
        else f"one probability per class, N x {len(classes)} ({', '.join(classes)})"
    )
    warning = (
        f"**Backbone weights: {weights}. Not transfer learning: trained from random weights.**\n\n"
        if weights.startswith("random")
        else ""
    )
    mean, std = (", ".join(f"{v:.3f}" for v in ckpt[k]) for k in ("mean", "std"))
    return warning + (
        f"**{run_name}** at its best epoch {int(ckpt.get('epoch', 0))}: {backbone} with a {head} head, the "
        f"whole network (pytorch flavor).\n\n"
        f"In: float32 images N x 3 x {crop} x {crop}, normalised with mean ({mean}) and std ({std}). "
        f"Out: {out}.\n\n"
        "Its metrics below are that epoch's; the test ones were measured on the data set under *Datasets used*."
    )


def log_model(classifier, ckpt: dict, run_name: str) -> None:
    """Log the full model (backbone + head) with the pytorch flavor into the active run, named after
    the run and at the best epoch's step, so that MLflow links it to that epoch's metrics and the
    test metrics (logged at the same step); its pyfunc takes normalised ``N x 3 x crop x crop``
    float32 images and returns P(ckpt['classes'][1]). Described (``model_description``); its test
    metrics linked to the run's data set (``link_dataset``)."""
    from mlflow.models import infer_signature

    from resnet_sweep.training.models import ProbabilityModel

    model = ProbabilityModel(classifier).cpu().eval()
    crop = int(ckpt["crop_size"])
    example = np.zeros((1, 3, crop, crop), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    step = int(ckpt.get("epoch", 0))
    info = mlflow.pytorch.log_model(
        model,
        name=model_name(run_name),
        step=step,
        tags={DESCRIPTION_TAG: model_description(ckpt, run_name)}
        | ({"weights_source": str(ckpt["weights_source"])} if "weights_source" in ckpt else {}),
        model_type="binary classifier" if len(ckpt["classes"]) == 2 else "classifier",
        signature=infer_signature(example, output),
        input_example=example,
        metadata={k: ckpt[k] for k in ("classes", "mean", "std", "crop_size")},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision"],
        serialization_format="pickle",  # torch.export would fix the batch size to the example's
        code_paths=[str(Path(__file__).resolve().parents[1])],  # unpickling needs resnet_sweep.training.models
    )
    if info.run_id:
        link_dataset(info.model_id, info.run_id, step=step)


def link_dataset(model_id: str, run_id: str, *, step: int) -> None:
    """The model's test metrics at ``step`` logged again with the run's data set (its one dataset
    input), which the model page lists under *Datasets used*. ``log_model`` copies the run's metrics
    at its step without their data set (MLflow's run metrics do not store it), so these rows come
    beside those copies. No dataset input: nothing to link."""
    client = MlflowClient()
    inputs = client.get_run(run_id).inputs
    datasets = [i.dataset for i in (inputs.dataset_inputs if inputs else [])]
    if not datasets:
        return
    dataset = datasets[0]
    stamp = int(time.time() * 1000)
    metrics = [
        Metric(m.key, m.value, stamp, step, model_id=model_id, dataset_name=dataset.name, dataset_digest=dataset.digest)
        for m in client.get_logged_model(model_id).metrics or []
        if m.key.startswith("test/") and m.step == step and m.dataset_name is None
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
