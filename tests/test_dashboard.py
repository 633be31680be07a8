"""The sweep's interactive dashboard (``dashboard.html`` on every sweep's parent run): what it plots,
that it opens offline and stays small. That its plots render in a browser: test_mlflow_ui.py."""

from __future__ import annotations

import html
import json
import re

import pytest
from conftest import FAST, client_for, make_tree, mlflow_runs, run_app


def sections(page: str) -> dict[str, dict | None]:
    """Section title -> its plotly figure (data and layout), None for a note alone."""
    titles = dict(re.findall(r'<h2 id="section-(\d+)">(.*?)</h2>', page))
    figures = dict(re.findall(r'<script type="application/json" data-figure="plot-(\d+)">(.*?)</script>', page, re.S))
    return {html.unescape(t): json.loads(figures[i]) if i in figures else None for i, t in titles.items()}


def dashboard_of(cwd, tmp_path) -> str:
    (parent,) = mlflow_runs(cwd).parents
    path = client_for(cwd).download_artifacts(parent.info.run_id, "dashboard.html", str(tmp_path))
    return open(path).read()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two sweeps of two epochs: two learning rates a hundredfold apart; two seeds."""
    cwd = tmp_path_factory.mktemp("grid")
    tree = make_tree(cwd / "tiles")
    run_app(cwd, "-m", *FAST, "trainer.max_epochs=2", "data=imagefolder", f"data.root={tree}", "optimizer.lr=1e-4,1e-2")
    run_app(
        cwd,
        "-m",
        *FAST,
        "trainer.max_epochs=2",
        "data=imagefolder",
        f"data.root={tree}",
        "optimizer.lr=1e-3",
        "seed=0,1",
    )
    return cwd


def test_every_sweep_gets_a_dashboard_that_opens_offline_and_weighs_under_5_mb(grid, tmp_path):
    runs = mlflow_runs(grid)
    assert len(runs.parents) == 2
    for parent in runs.parents:
        artifacts = {a.path for a in client_for(grid).list_artifacts(parent.info.run_id)}
        assert "dashboard.html" in artifacts
    path = client_for(grid).download_artifacts(runs.parents[0].info.run_id, "dashboard.html", str(tmp_path))
    page = open(path).read()
    assert len(page.encode()) < 5_000_000
    assert not re.search(r"https?://|//cdn|src=", page), "the page must not load anything from the network"
    assert 'id="plotly-js-gzip"' in page  # plotly.js bundled, packed


def test_the_swept_learning_rate_is_on_a_log_axis_against_the_objective_and_test_metrics_the_chosen_run_starred(
    grid, tmp_path
):
    runs = mlflow_runs(grid)
    parent = next(p for p in runs.parents if p.data.params.get("optimizer.lr") == "1e-4,1e-2")
    path = client_for(grid).download_artifacts(parent.info.run_id, "dashboard.html", str(tmp_path))
    page = open(path).read()
    figures = sections(page)
    fig = figures["Swept keys against the objective and the test metrics"]
    layout = fig["layout"]
    assert [layout[f"xaxis{s}"]["type"] for s in ("", "2", "3")] == ["log"] * 3  # one row: the LR
    titles = [a["text"] for a in layout["annotations"]]
    assert titles == ["valid loss vs lr", "test acc vs lr", "test loss vs lr"]
    children = [r for r in runs.children if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    best = next(r for r in children if r.info.run_id == parent.data.tags["best_run_id"])
    stars = [t for t in fig["data"] if t["marker"].get("symbol") == "star"]
    assert stars[0]["name"] == f"chosen on validation: {best.info.run_name}"
    assert stars[0]["y"] == [best.data.metrics["best/valid/loss"]]
    assert stars[0]["x"] == [float(best.data.params["optimizer.lr"])]
    points = fig["data"][0]
    assert sorted(points["x"]) == [1e-4, 1e-2] and sorted(points["text"]) == sorted(r.info.run_name for r in children)
    assert len(set(points["marker"]["color"])) == 2  # coloured by the learning rate
    # every run's validation curves, one colour per learning rate, the chosen run thick
    curves = figures["Validation curves of every run"]
    lines = [t for t in curves["data"] if t.get("mode") == "lines+markers"]
    assert sorted({t["name"].removesuffix(" (chosen)") for t in lines}) == sorted(r.info.run_name for r in children)
    assert all(t["x"] == [0, 1, 2] for t in lines)
    assert len({t["line"]["color"] for t in lines}) == 2
    assert {t["line"]["width"] for t in lines if t["name"].endswith("(chosen)")} == {4}
    assert any(t["marker"].get("showscale") for t in curves["data"])  # the colour bar of the LR
    pc = figures["Parallel coordinates"]["data"][0]
    assert [d["label"] for d in pc["dimensions"]] == ["lr (log)", "valid loss"]
    assert figures["Mean ± std over seeds"] is None  # one seed: a note says how to get the spread


def test_seeds_are_averaged_with_their_spread(grid, tmp_path):
    runs = mlflow_runs(grid)
    parent = next(p for p in runs.parents if p.data.params.get("seed") == "0,1")
    path = client_for(grid).download_artifacts(parent.info.run_id, "dashboard.html", str(tmp_path))
    fig = sections(open(path).read())["Mean ± std over seeds"]
    children = [r for r in runs.children if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    accs = [r.data.metrics["test/acc"] for r in children]
    (acc,) = [t for t in fig["data"] if t["xaxis"] == "x2"]
    assert acc["y"] == [pytest.approx(sum(accs) / 2)]
    assert acc["error_y"]["array"] == [pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)]
    assert acc["customdata"] == [2]


def test_an_optuna_studys_dashboard_has_optunas_own_plots(tmp_path, tiny_tree):
    run_app(
        tmp_path,
        "-m",
        "hydra/sweeper=optuna",
        *FAST,
        "data=imagefolder",
        f"data.root={tiny_tree}",
        "trainer.max_epochs=2",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.n_trials=3",
        "optimizer.lr=tag(log, interval(1e-4, 1e-1))",
        "optimizer.momentum=interval(0.5, 0.9)",
    )
    figures = sections(dashboard_of(tmp_path, tmp_path / "dl"))
    for title in (
        "Optuna: optimization history",
        "Optuna: intermediate values",
        "Optuna: slice",
        "Optuna: parallel coordinates",
        "Optuna: contour",
        "Optuna: parameter importances",
    ):
        assert figures[title]["data"], title
    swept = figures["Swept keys against the objective and the test metrics"]["layout"]
    assert swept["xaxis"]["type"] == "log" and swept["xaxis4"].get("type") != "log"  # lr; momentum
