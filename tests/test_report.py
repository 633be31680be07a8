"""Study presets, `resnet-sweep report` and `resnet-sweep predict`, as a user runs them."""

from __future__ import annotations

import csv
import re

import pytest
from conftest import FAST, hydra_conf, mlflow_runs, run_app
from PIL import Image


def resnet_sweep(cwd, *args, check=True):
    """``python -m resnet_sweep.tools.cli ARGS`` in ``cwd``, in-process (run_app)."""
    return run_app(cwd, *args, check=check, module="resnet_sweep.tools.cli")


def table_after(markdown: str, heading: str) -> list[list[str]]:
    block = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [l for l in block.splitlines() if l.startswith("|")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def test_study_resnet18_heads_smoke_run_makes_one_child_per_grid_point(tmp_path, tiny_tree):
    # the preset's LR lists cut down to one by one override: Adam + SGD x 3 heads (the grids sweeper's
    # own logic, on a trivial objective: test_sweepers.py)
    run_app(
        tmp_path,
        "-m",
        "experiment=study/resnet18_heads",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "optimizer.lr=1e-3",
    )
    runs = mlflow_runs(tmp_path)
    assert len(runs.parents) == 1 and len(runs.children) == 4
    points = sorted(
        (r.data.params["head.name"], r.data.tags["optimizer"], r.data.params["optimizer.lr"]) for r in runs.children
    )
    assert points == sorted(
        [("linear", "adam", "0.001")] + [(h, "sgd", "0.001") for h in ("linear", "mlp_relu", "mlp_leakyrelu_dropout")]
    )
    assert {r.data.params["trainer.batch_size"] for r in runs.children} == {"8"}


@pytest.mark.parametrize("preset", ["resnet18_heads", "resnet_depths", "resnet34_repeats"])
def test_study_presets_follow_the_epoch_budget_rule(preset):
    from hydra import compose

    import resnet_sweep  # noqa: F401  (registers the rs.epoch_budget resolver)

    budget = {1e-6: 100, 5e-6: 100, 5e-5: 100, 1e-4: 25, 5e-4: 10, 1e-3: 5}
    with hydra_conf():
        for lr, epochs in budget.items():
            cfg = compose("train", overrides=[f"experiment=study/{preset}", f"optimizer.lr={lr}"])
            assert cfg.trainer.max_epochs == epochs, (preset, lr)
            assert cfg.trainer.batch_size == 32 and cfg.trainer.patience is None


def test_report_has_the_study_columns_order_bold_best_and_epochs(tmp_path, tiny_tree):
    run_app(
        tmp_path,
        "-m",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "trainer.max_epochs=2",
        "optimizer=sgd,adam",
        "optimizer.lr=1e-2,1e-4",
    )
    proc = resnet_sweep(tmp_path, "report", "--out", str(tmp_path / "rep"))
    md = proc.stdout
    rows = table_after(md, "## resnet18 with a linear head")
    assert rows[0] == [
        *["Optimizer", "Learning rate", "Momentum", "Epochs (best)", "Batch size", "Valid loss (best epoch)"],
        *["Test loss", "Test acc", "Test balanced acc", "Test AUROC", "Test F1"],
    ]
    body = rows[2:]
    plain = [[c.strip("*") for c in r] for r in body]
    assert [(r[0], r[1]) for r in plain] == [("Adam", "1e-04"), ("Adam", "1e-02"), ("SGD", "1e-04"), ("SGD", "1e-02")]
    assert all(re.fullmatch(r"2 \([012]\)", r[3]) for r in plain)
    assert all(re.fullmatch(r"\d+\.\d\d%", r[7]) for r in plain)
    assert plain[2][2] == "0.9" and plain[0][2] == "(0.9, 0.999)"
    bold = [i for i, r in enumerate(body) if all(c.startswith("**") for c in r)]
    assert len(bold) == 1
    runs = mlflow_runs(tmp_path).children
    best = min(runs, key=lambda r: r.data.metrics["best/valid/loss"])
    name = {"adam": "Adam", "sgd": "SGD"}[best.data.tags["optimizer"]]
    assert (plain[bold[0]][0], float(plain[bold[0]][1])) == (name, float(best.data.params["optimizer.lr"]))
    # the bold row is the one with the best value in the objective's column
    assert float(plain[bold[0]][5]) == min(float(r[5]) for r in plain)
    assert float(plain[bold[0]][5]) == pytest.approx(best.data.metrics["best/valid/loss"], abs=1e-4)
    # the most important table first: the best run per backbone, then the runs' tables
    assert md.index("## Best run per backbone") < md.index("## resnet18 with a linear head")
    assert table_after(md, "## Best run per backbone")[0][6] == "Valid loss (best epoch)"
    # random weights (backbone.weights=none): a loud line, no ImageNet figures
    assert "**Backbone weights: random. Not transfer learning" in md
    assert "ImageNet" not in md.split("Not transfer learning", 1)[1].split("\n", 1)[1] and "69.758" not in md
    for f in ("report.md", "runs.csv", "test_acc_vs_lr.png", "learning_curves.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0
    parent = mlflow_runs(tmp_path).parents[0]
    from conftest import client_for

    assert {a.path for a in client_for(tmp_path).list_artifacts(parent.info.run_id, "report")} >= {
        "report/report.md",
        "report/runs.csv",
        "report/test_acc_vs_lr.png",
    }


def test_report_seed_table_shows_per_seed_values_and_mean_std(tmp_path, tiny_tree):
    run_app(tmp_path, "-m", *FAST, "data=imagefolder", f"data.root={tiny_tree}", "optimizer.lr=1e-2,1e-3", "seed=0,1,2")
    md = resnet_sweep(tmp_path, "report").stdout
    rows = table_after(md, "## resnet18 with a linear head")
    assert rows[0][3:7] == ["Seeds", "Valid loss (best epoch) mean ± std", "Test acc per seed", "Test acc mean ± std"]
    body = [[c.strip("*") for c in r] for r in rows[2:]]
    assert [r[1] for r in body] == ["1e-03", "1e-02"]
    for r in body:
        assert r[3] == "0, 1, 2"
        assert re.fullmatch(r"\d\.\d{4} ± \d\.\d{4}", r[4])
        accs = [float(a) for a in r[5].split(", ")]
        mean = sum(accs) / 3
        assert re.fullmatch(r"\d+\.\d\d% ± \d+\.\d\d%", r[6])
        assert float(r[6].split("%")[0]) == pytest.approx(mean, abs=0.01)


def test_imagenet_figures_of_pretrained_backbones_come_from_torchvisions_metadata():
    from resnet_sweep.reports.report_tables import imagenet_table

    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in imagenet_table({"resnet18": "IMAGENET1K_V1"}).splitlines()
    ]
    assert rows[2][:4] == ["resnet18", "IMAGENET1K_V1", "69.758", "89.078"]


def test_predict_returns_probabilities_and_names_the_bad_file(tmp_path, tiny_tree):
    run_app(tmp_path, "-m", *FAST, "data=imagefolder", f"data.root={tiny_tree}", "optimizer.lr=1e-2,1e-3")
    images = tmp_path / "new"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (200, 30 * i, 30)).save(images / f"ok{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = resnet_sweep(tmp_path, "predict", str(images), "--best", "--out", str(tmp_path / "pred.csv"))
    assert "broken.png" in proc.stderr and "1 file(s) could not be read" in proc.stderr
    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == ["ok0.png", "ok1.png", "ok2.png"]
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)
    assert all(r["label"] in ("a_class", "b_class") for r in rows)
    # the logged model (unpickled on request) gives the same probabilities
    resnet_sweep(tmp_path, "predict", str(images), "--best", "--logged-model", "--out", str(tmp_path / "pred2.csv"))
    with open(tmp_path / "pred2.csv") as f:
        again = {r["path"]: float(r["probability"]) for r in csv.DictReader(f)}
    assert all(abs(again[r["path"]] - float(r["probability"])) < 1e-4 for r in rows)
    # any run, with or without a logged model, is rebuilt from its checkpoint
    other = next(r for r in mlflow_runs(tmp_path).children if "best_run_id" not in r.data.tags)
    proc = resnet_sweep(tmp_path, "predict", str(images), "--run", other.info.run_id, "--out", str(tmp_path / "p2.csv"))
    assert "3 predictions" in proc.stdout


def test_report_without_a_sweep_is_a_one_line_error(tmp_path):
    proc = resnet_sweep(tmp_path, "report", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"resnet-sweep report: --tracking-uri sqlite:///mlflow.db: no MLflow store at "
        f"{tmp_path / 'mlflow.db'}; run a sweep here first or point --tracking-uri at your store"
    )
    proc = resnet_sweep(
        tmp_path, "report", "--experiment", "nope", "--tracking-uri", f"sqlite:///{tmp_path / 'other.db'}", check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_reports_of_one_run_and_of_none_warn_of_nothing_and_an_all_failed_sweep_says_its_summary_once(
    tmp_path, tiny_tree, recwarn
):
    """One finished run (one learning rate: matplotlib's 'identical low and high xlims'), then a
    sweep whose every job fails (no finished run: 'No artists with labels found')."""
    data = [*FAST, "data=imagefolder", f"data.root={tiny_tree}"]
    run_app(tmp_path, "-m", *data, "optimizer.lr=1e-3")
    proc = run_app(tmp_path, "-m", *data, "optimizer.lr=1e38,2e38", "trainer.max_epochs=2", check=False)
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in recwarn
        if "matplotlib" in w.filename or "resnet_sweep" in w.filename
    ]
    assert ours == []
    assert all(p.data.tags.get("mlflow.note.content") for p in mlflow_runs(tmp_path).parents), "both reports made"
    summary = "0 finished, 2 failed: resnet18-linear-sgd-lr1e+38-s0 (loss became NaN at epoch 1)"
    assert proc.returncode == 1
    assert (proc.stdout + proc.stderr).count(summary) == 1
    assert summary in proc.stderr.strip().splitlines()[-1]
