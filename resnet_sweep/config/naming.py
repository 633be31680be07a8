"""What a run is called and what it records as its config: ``resnet18-linear-sgd-lr1e-04-s0``."""

from __future__ import annotations

from typing import NamedTuple

from omegaconf import OmegaConf

from resnet_sweep.core.redaction import redact


def flatten(d, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"optimizer.lr": "0.0001", ...}`` (credentials redacted)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = redact(value)
    return out


def app_config(cfg) -> dict:
    """The resolved config without Hydra's own node."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # choices as plain strings
    container.pop("hydra", None)
    return container


# What does not describe the experiment: where things are stored, how fast they run, Hydra's
# instantiation keys, the run's own name. In config.yaml and the run's tags, not in its params.
PLUMBING = (
    "tracking.",
    "data.cache_dir",
    "data.tile_store",
    "data.root",  # the data_root tag; the data set itself is the run's input
    "trainer.num_workers",
    "trainer.device",  # the device tag says which one ran
    "trainer.resume",
    "trainer.bank_batch_size",
    "trainer.batch_heads",  # how it runs, not what it computes
    "run_name",
    "hpo_trial.",  # the optuna_trial tag: a param cannot change, and a replacement trial continues the run
)


def experiment_params(config: dict) -> dict[str, str]:
    """The run's params: the flattened config that describes the experiment (no plumbing, no
    ``_target_``/``_partial_``, no empty values), what the runs table and compare page show."""
    return {
        k: v
        for k, v in flatten(config).items()
        if not k.startswith(PLUMBING)
        and not k.endswith(("._target_", "._partial_"))
        and v not in ("None", "{}", "[]", "")
    }


def lr_label(lr: float) -> str:
    """``1e-04`` where one significant digit says it exactly, else three (``2.5e-05``)."""
    short = f"{lr:.0e}"
    return short if float(short) == lr else f"{lr:.3g}"


def optimizer_name(optimizer_cfg) -> str:
    return str(optimizer_cfg._target_).rsplit(".", 1)[-1].lower()


def run_name(cfg) -> str:
    """``cfg.run_name``, or (``auto``) backbone-head-optimizer-lr[what trains]-seed[-t<Optuna trial>]."""
    if cfg.run_name and cfg.run_name != "auto":
        return str(cfg.run_name)
    trial = cfg.get("hpo_trial")
    return (
        f"{cfg.backbone.name}-{cfg.head.name}-{optimizer_name(cfg.optimizer)}"
        f"-lr{lr_label(float(cfg.optimizer.lr))}{what_trains(cfg.backbone).suffix}-s{cfg.seed}"
        + (f"-t{trial.number}" if trial else "")
    )


def safe_run_name(cfg) -> str:
    """``run_name``, or the configured name (``job``) where the config itself is wrong
    (``optimizer.lr=abc``: the checks say which key)."""
    try:
        return run_name(cfg)
    except Exception:
        return str(cfg.get("run_name") or "job")


class Trains(NamedTuple):
    """What ``backbone.freeze`` leaves trainable."""

    suffix: str  # of the run name: '' (linear probe), '-ft', '-last2', '-layer3+layer4'
    description: str  # the run's ``trains`` tag: 'head', 'all', 'head + last 2 layers', 'head + layer3, layer4'


def what_trains(backbone_cfg) -> Trains:
    freeze = str(backbone_cfg.freeze)
    if freeze == "none":
        return Trains("-ft", "all")
    if freeze == "last_n":
        n = backbone_cfg.unfreeze
        return Trains(f"-last{n}", f"head + last {n} layers")
    if freeze == "stages":
        stages = [str(s) for s in (backbone_cfg.stages or [])]
        return Trains("-" + "+".join(stages), "head + " + ", ".join(stages))
    return Trains("", "head")
