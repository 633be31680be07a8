"""Config checked once, typed: every field of every typed group (resnet_sweep.config.schema) refuses a wrong
value (type, choice, range) in one line, exit 2, with nothing created, for a single run and for a
sweep whose bad value is in its last point; a key a typed group does not have is refused, `+` or
not; what only the data or the machine can tell is found by the pre-flight, before any run exists.
In-process (``run_app``) except one real single run and one real sweep."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import typing
from enum import Enum

import pytest
import torch
from conftest import FAST, REPO, TRAIN_PY, compose_cfg, hydra_conf, run_app
from hydra import compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ValidationError

from resnet_sweep.config import checks, schema
from resnet_sweep.core.errors import UserError
from resnet_sweep.sweep import preflight

GROUPS = [(schema.TOP, schema.AppConf)] + [(g, node) for g, _, node in schema.SCHEMAS]


def composed(*overrides: str):
    return compose_cfg(*overrides)


DEFAULTS = composed()


def every_field():
    """(group, key, field, type) of every field of every schema, once (the demo's data fields
    include the others')."""
    seen = set()
    for group, node in GROUPS:
        hints = typing.get_type_hints(node)
        for f in dataclasses.fields(node):
            if (group, f.name) not in seen:
                seen.add((group, f.name))
                yield group, f.name, f, hints[f.name]


def wrong_values(f, hint) -> list[tuple[str, str]]:
    """(what is wrong, the value as typed on the command line) for a field: its type, and its
    choices, pattern or range where it declares them."""
    kind = typing.get_origin(hint) or hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if kind in (typing.Union, types.UnionType):
        kind = typing.get_origin(args[0]) or args[0]
    wrong = []
    if isinstance(kind, type) and issubclass(kind, Enum):
        wrong.append(("choice", "bogus"))
    elif kind is bool:
        wrong.append(("type", "maybe"))
    elif kind in (int, float):
        wrong.append(("type", "abc"))
    elif kind is str:
        wrong.append(("type", "[a,b]"))
    elif kind in (list, dict):
        wrong.append(("type", "abc"))
    else:  # Any: loss.class_weight, its form checked by checks.class_weight
        wrong.append(("choice", "heavy"))
    meta = f.metadata
    if meta.get("choices"):
        wrong.append(("choice", "bogus"))
    if meta.get("pattern"):
        wrong.append(("choice", "tpu"))
    if meta.get("length"):
        wrong.append(("range", "[" + ",".join(["1"] * (meta["length"] - 1)) + "]"))
    for bound, outside in (("ge", lambda b: b - 1), ("le", lambda b: b + 1), ("lt", lambda b: b)):
        if meta.get(bound) is not None:
            value = outside(meta[bound])
            wrong.append(("range", f"[{value}]" if kind is list else str(value)))
    return wrong


CASES = [
    pytest.param(group, key, value, id=f"{group or 'top'}.{key}={value} ({what})")
    for group, key, f, hint in every_field()
    for what, value in wrong_values(f, hint)
]


def name(group: str, key: str) -> str:
    return f"{group}.{key}" if group else key


def typed(value) -> str:
    """A composed value as a command line would type it."""
    value = OmegaConf.to_container(value, enum_to_str=True) if OmegaConf.is_config(value) else value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(typed(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{typed(v)}" for k, v in value.items()) + "}"
    return f"'{value}'" if isinstance(value, str) else str(value)


def good_value(group: str, key: str) -> str:
    return typed((DEFAULTS if group == schema.TOP else DEFAULTS[group])[key])


def assert_refused(proc, key: str, work):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].lstrip("+~").startswith(key.lstrip("+~")), lines
    assert sorted(p.name for p in work.iterdir()) == [], "nothing created: no mlflow.db, no run, no outputs"


def test_the_walk_covers_every_field_of_every_typed_group():
    walked = {(g, k) for g, k, _, _ in every_field()}
    for group, node in GROUPS:
        assert {(group, f.name) for f in dataclasses.fields(node)} <= walked
    assert len({(p.values[0], p.values[1]) for p in CASES}) == len(walked)  # a wrong value for each
    # the values that used to pass the up-front check are among them (backbone.resize=100, a
    # rule between two keys, is checks.check_backbone's: test_once_composed_...)
    tried = {(name(p.values[0], p.values[1]), p.values[2]) for p in CASES}
    assert {
        ("data.tile_store", "bogus"),
        ("data.tile_store_device", "bogus"),
        ("trainer.crop_seed", "-1"),
        ("trainer.device", "tpu"),
        ("backbone.freeze", "bogus"),
        ("data.tile_store_max_gb", "-1"),
        ("seed", "-1"),
        ("seed", "4294967296"),
    } <= tried


@pytest.mark.parametrize("mode", ["run", "sweep"])
@pytest.mark.parametrize("group,key,value", CASES)
def test_a_wrong_value_for_any_field_is_one_line_exit_2_and_nothing_created(tmp_path, group, key, value, mode):
    key_name = name(group, key)
    args = [f"{key_name}={value}"] if mode == "run" else ["-m", f"{key_name}={good_value(group, key)},{value}"]
    proc = run_app(tmp_path, *args, check=False, store=False)
    assert_refused(proc, key_name, tmp_path)


@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["+trainer.max_epoch=3"],
            "+trainer.max_epoch: trainer has no key 'max_epoch'; did you mean trainer.max_epochs?",
        ),
        (
            ["trainer.max_epoch=3"],
            "trainer.max_epoch: trainer has no key 'max_epoch'; did you mean trainer.max_epochs?",
        ),
        (["++backbone.frezze=none"], "++backbone.frezze: backbone has no key 'frezze'; did you mean backbone.freeze?"),
        (["-m", "+data.seeds=1,2"], "+data.seeds: data has no key 'seeds'; did you mean data.seed?"),
        (["~trainer.resume"], "~trainer.resume: the keys of trainer cannot be removed; set trainer.resume=... instead"),
        (["data.group=slide(["], "data.group=slide([: not an override Hydra can read (no viable alternative"),
        # the untyped groups and the top level: their YAML files say their keys (+ adds one)
        (["optimizer.momentun=0.8"], "optimizer.momentun: no optimizer config has key 'momentun'; did you mean"),
        (["head.dropuot=0.1"], "head.dropuot: no head config has key 'dropuot'; did you mean head.dropout?"),
        (["seeds=3"], "seeds: no top-level key 'seeds'; did you mean seed?"),
        (["+head.dropuot=0.1"], 'head.dropuot=0.1: TypeError("Head.__init__() got an unexpected keyword argument'),
    ],
)
def test_an_unknown_key_or_an_unreadable_override_is_one_line_exit_2_and_nothing_created(tmp_path, args, line):
    proc = run_app(tmp_path, *args, check=False, store=False)
    assert_refused(proc, line.split(":")[0], tmp_path)
    assert proc.stderr.strip().startswith(line)


RANGES_AND_CHOICES = [
    ("trainer.crop_seed=-1", "trainer.crop_seed=-1: must be an integer >= 0"),
    ("trainer.device=tpu", "trainer.device=tpu: choose auto, cpu, cuda or cuda:N"),
    ("data.tile_store_max_gb=-1", "data.tile_store_max_gb=-1.0: must be a number >= 0"),
    ("backbone.resize=100", "backbone.resize=100: must be null or an integer >= backbone.crop_size (224)"),
    ("seed=-1", "seed=-1: must be an integer >= 0 and < 4294967296"),
    ("seed=4294967296", "seed=4294967296: must be an integer >= 0 and < 4294967296"),
    ("trainer.precision=16", "trainer.precision=16: choose auto, bf16 or 32"),
    ("data.classes=4", "data.classes=4: must be an integer >= 2 and <= 3"),
    ("+trainer.max_epoch=3", "trainer.max_epoch: trainer has no key 'max_epoch'; did you mean trainer.max_epochs?"),
    ("backbone.freeze=last_n", "backbone.unfreeze=null: with backbone.freeze=last_n, give the number"),
    ("backbone.weights=/no/such.pt", "backbone.weights=/no/such.pt: no such file; use auto, imagenet, none"),
]


@pytest.mark.parametrize("override,message", RANGES_AND_CHOICES)
def test_once_composed_the_same_values_are_refused_by_check_config(override, message):
    """What a preset, an Optuna search space or a range() sweep sets never passes check_overrides:
    the composed config is checked again, for every job and every sweep point."""
    with pytest.raises(UserError) as e:
        checks.check_config(composed(override))
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "override", ["data.tile_store=maybe", "data.tile_store_device=bogus", "backbone.freeze=some", "data.augment=[flip]"]
)
def test_a_wrong_choice_cannot_even_be_composed(override):
    with pytest.raises(ConfigCompositionException) as e:
        composed(override)
    assert isinstance(e.value.__cause__, ValidationError)


def test_a_key_added_to_the_other_data_schema_is_refused_once_composed():
    cfg = composed("data=imagefolder", "data.root=/tmp", "+data.seed=3")
    with pytest.raises(UserError, match=r"^data.seed: data \(data=imagefolder\) has no key 'seed'"):
        checks.check_config(cfg)


def test_a_bad_value_in_the_last_point_of_a_range_sweep_stops_the_sweep_before_anything(tmp_path):
    # range() is not expanded on the command line: the pre-flight finds it composing every point
    proc = run_app(tmp_path, "-m", *FAST, "trainer.crop_seed=range(1,-2,-1)", check=False, store=False)
    assert_refused(proc, "trainer.crop_seed=-1: must be an integer >= 0", tmp_path)


@pytest.mark.parametrize(
    "args,message",
    [
        (["trainer.device=cuda"], "trainer.device=cuda: CUDA is not available here; use auto or cpu"),
        (["data.group='nomatch(x)'"], "data.group='nomatch(x)' does not match 'slidetr000_tile000.png'"),
        (["-m", "data.group='slide([^_]+)_','slide(['"], "data.group='slide([': not a regular expression"),
        (["-m", "loss.class_weight=[1,1],[1,2,3]"], "loss.class_weight=[1.0, 2.0, 3.0]: 3 weight(s) for 2 classes"),
        (["-m", "backbone.freeze=all,last_n"], "backbone.unfreeze=null: with backbone.freeze=last_n"),
    ],
)
def test_what_needs_the_data_or_the_machine_is_found_before_any_run(tmp_path, args, message):
    if "trainer.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    flags, overrides = [a for a in args if a == "-m"], [a for a in args if a != "-m"]
    proc = run_app(tmp_path, *flags, *FAST, *overrides, check=False, store=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing created: no mlflow.db, no run, no outputs"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args,message",
    [
        (["data.tile_store_max_gb=-1"], "data.tile_store_max_gb=-1: must be a number >= 0"),
        (["-m", "loss.class_weight=[1,1],[1,2,3]"], "loss.class_weight=[1.0, 2.0, 3.0]: 3 weight(s) for 2 classes"),
    ],
    ids=["single run", "sweep, bad last point"],
)
def test_a_real_process_refuses_a_bad_value_in_one_line_exit_2_and_creates_nothing(tmp_path, args, message):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    flags, overrides = [a for a in args if a == "-m"], [a for a in args if a != "-m"]
    cmd = [sys.executable, str(TRAIN_PY), *flags, *FAST, *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing created: no mlflow.db, no run, no outputs"


def test_a_bad_value_in_the_last_grid_stops_the_sweep_before_anything(tmp_path):
    # what the grids sweeper sweeps (a preset's hydra.sweeper.grids) is not on the command line
    grids = "hydra.sweeper.grids=[{trainer.crop_seed:'0'},{trainer.crop_seed:'1,-1'}]"
    proc = run_app(tmp_path, "-m", *FAST, "hydra/sweeper=grids", grids, check=False, store=False)
    assert_refused(proc, "trainer.crop_seed=-1: must be an integer >= 0", tmp_path)


@pytest.mark.parametrize(
    "preset,key,value,message",
    [
        ("experiment=demo", "trainer.crop_seed", "0,-1", "trainer.crop_seed=-1: must be an integer >= 0"),
        ("hpo=lr_search", "trainer.crop_seed", "int(interval(-1, 3))", "trainer.crop_seed=-1: must be an integer >= 0"),
        ("hpo=lr_search", "optimizer.lr", "tag(log, interval(0.0, 1e-2))", "optimizer.lr=0.0: the learning rate"),
        ("hpo=lr_search", "data.tile_store", "choice(auto, maybe)", "data.tile_store=maybe: choose auto or off"),
    ],
    ids=["grid params", "optuna interval", "optuna log interval", "optuna choice"],
)
def test_a_bad_value_in_a_presets_sweeper_params_is_found_composing_every_point(capsys, preset, key, value, message):
    with hydra_conf():
        config = compose("train", overrides=[preset], return_hydra_config=True)
        preflight.check_sweep(config, every_point=True)  # the preset itself: fine
        with open_dict(config):
            config.hydra.sweeper.params[key] = value
        with pytest.raises(SystemExit) as e:
            preflight.check_sweep(config, every_point=True)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)


@pytest.mark.parametrize(
    "path,schema_class",
    [
        ("trainer/default.yaml", schema.TrainerConf),
        ("tracking/default.yaml", schema.TrackingConf),
        ("loss/default.yaml", schema.LossConf),
        ("data/demo.yaml", schema.DemoDataConf),
        ("data/imagefolder.yaml", schema.DataConf),
        ("backbone/resnet18.yaml", schema.BackboneConf),
    ],
)
def test_the_yaml_files_show_the_schemas_defaults_not_other_ones(path, schema_class):
    """The group files list every key with a comment for the reader; a value there that differs from
    the schema's default would be a second default (the YAML wins): only the schema holds them."""
    shown = OmegaConf.load(REPO / "conf" / path)
    defaults = OmegaConf.to_container(OmegaConf.structured(schema_class), enum_to_str=True)
    per_file = {"name", "imagenet_weights", "kind", "root", "cache_dir"}  # what the file is, not a default
    differ = {
        k: (shown[k], defaults[k])
        for k in shown
        if k != "defaults" and k not in per_file and k in defaults and shown[k] != defaults[k]
    }
    assert differ == {}
