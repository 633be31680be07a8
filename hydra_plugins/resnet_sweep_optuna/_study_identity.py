"""One study, one experiment: a study records its data's fingerprint and its fixed config (the app
config without the searched params and the keys that do not change results) in its user attrs.
``%id%`` in ``study_name`` (the ``hpo=`` presets) is a digest of both, so other data or settings make
another study; a named study resumed or joined with other data or settings is refused in one line
naming what differs."""

from __future__ import annotations

import json
import logging
import time

from omegaconf import OmegaConf

from resnet_sweep.core import sealed
from resnet_sweep.core.errors import UserError
from resnet_sweep.core.redaction import redact
from resnet_sweep.data import loading, shared_tree

log = logging.getLogger(__name__)

# what identifies a study (its user attrs) and the study_name token replaced by their digest
ID_TOKEN = "%id%"
DATA_ATTR, CONFIG_ATTR, SEARCHED_ATTR = "data_fingerprint", "fixed_config", "searched_params"
# app config keys that say where or how a job runs, not what it computes: not part of a study's identity
NOT_RESULTS = (
    "hpo_trial",
    "tracking",
    "run_name",
    "trainer.num_workers",
    "trainer.resume",
    "trainer.resume_dir",
    "data.cache_dir",
    "data.root",
    "data.tile_store",
    "data.tile_store_max_gb",
    "data.tile_store_device",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(key: str, roots) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def _param_root(key: str) -> str:
    """``+optimizer.lr`` / ``optimizer@x`` -> the config path it sets."""
    return key.lstrip("+~").split("@", 1)[0]


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def identity_differences(was: dict, now: dict) -> list[str]:
    """What differs between a study's recorded identity and this sweep's, in words."""
    parts = []
    if was.get(DATA_ATTR) != now[DATA_ATTR]:
        parts.append(f"on other data (fingerprint {str(was.get(DATA_ATTR))[:8]} -> {now[DATA_ATTR][:8]})")
    old, new = was.get(CONFIG_ATTR) or {}, now[CONFIG_ATTR]
    old_searched, new_searched = set(was.get(SEARCHED_ATTR) or []), set(now[SEARCHED_ATTR])
    changes = [
        f"{key}={_show(old[key])}, now {_show(new[key])}" for key in sorted(set(old) & set(new)) if old[key] != new[key]
    ]
    changes += [
        f"{root} fixed, now searched"
        for root in sorted(new_searched - old_searched)
        if any(_under(key, [root]) for key in old)
    ]
    changes += [
        f"{root} searched, now fixed"
        for root in sorted(old_searched - new_searched)
        if any(_under(key, [root]) for key in new)
    ]
    if changes:
        shown = changes[:4] + ([f"{len(changes) - 4} more keys"] if len(changes) > 4 else [])
        parts.append("with " + " and ".join(shown))
    return parts


class StudyIdentity:
    """The study-identity part of ``OptunaSweeperImpl`` (which sets ``config``, ``hydra_context``,
    ``study_name``, ``storage``, ``storage_url`` and ``created``)."""

    def _identity(self, distributions, fixed: dict[str, str]) -> dict:
        """What the study's trials have in common: the data's fingerprint and the fixed config (the
        app config composed with the fixed overrides, without the searched params, Hydra's node,
        per-job keys and keys that do not change results)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, [f"{k}={v}" for k, v in fixed.items()])
        searched = sorted({_param_root(k) for k in distributions})
        app = {
            key: OmegaConf.to_container(cfg[key], resolve=True, enum_to_str=True)
            if OmegaConf.is_config(cfg[key])
            else cfg[key]
            for key in cfg
            if key != "hydra"
        }
        config = {k: v for k, v in _flatten(app).items() if not _under(k, NOT_RESULTS + tuple(searched))}
        share = shared_tree.sweep_share(self.config.hydra)
        searched_data = any(_under(k, ["data"]) for k in searched)
        fingerprint = "searched" if searched_data else loading.data_fingerprint(cfg.data, share=share)
        return {SEARCHED_ATTR: searched, CONFIG_ATTR: config, DATA_ATTR: fingerprint}

    def _study_name(self, identity: dict) -> str | None:
        if not self.study_name or ID_TOKEN not in str(self.study_name):
            return self.study_name
        digest = sealed.json_key({"data": identity[DATA_ATTR], "config": identity[CONFIG_ATTR]}, 8)
        return str(self.study_name).replace(ID_TOKEN, digest)

    def _recorded_identity(self, study, wait_s: float = 30) -> dict | None:
        """The identity the study's creator recorded; a sweep that created it a moment ago is
        recording it now: wait for it. None: made before studies recorded one."""
        deadline = time.monotonic() + wait_s
        while True:
            attrs = study.user_attrs
            if DATA_ATTR in attrs:
                return attrs
            if time.monotonic() > deadline or self.storage_url is None or study.get_trials(deepcopy=False):
                return None
            time.sleep(0.2)

    def _check_identity(self, study, identity: dict) -> None:
        """Record the identity of a new study; refuse to add trials of other data or settings to an old one."""
        if not self.created:
            was = self._recorded_identity(study)
            if was is not None:
                differences = identity_differences(was, identity)
                if differences:
                    raise UserError(
                        redact(
                            f"hydra.sweeper.study_name={study.study_name}: the study was made "
                            f"{' / '.join(differences)}; use another study_name"
                        )
                    )
                return
            log.warning(
                "study '%s' was made before studies recorded their data and fixed config: recording "
                "this sweep's (data fingerprint %s)",
                study.study_name,
                identity[DATA_ATTR][:8],
            )
        for key in (SEARCHED_ATTR, CONFIG_ATTR, DATA_ATTR):  # the data last: a joining sweep waits for it
            study.set_user_attr(key, identity[key])

    def _mention_unnamed_predecessor(self, study) -> None:
        """A study of the same preset named before the %id% token: say that it is not continued."""
        if not self.created or self.storage_url is None or ID_TOKEN not in str(self.study_name):
            return
        old = str(self.study_name).replace("-" + ID_TOKEN, "").replace(ID_TOKEN, "")
        try:
            self.storage.get_study_id_from_name(old)
        except KeyError:
            return
        log.warning(
            "study '%s' (named before studies were named by their data and settings) is not continued: "
            "this sweep starts '%s'; hydra.sweeper.study_name=%s continues the old one if it was made on "
            "the same data and settings",
            old,
            study.study_name,
            old,
        )
