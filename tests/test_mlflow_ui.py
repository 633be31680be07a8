"""What a researcher sees in the MLflow UI (issue 17), checked in the store the UI reads: the
experiment's kind, the runs' params, descriptions, inputs and models, the sweep's parent run."""

from __future__ import annotations

import pytest
from conftest import FAST, client_for, make_tree, mlflow_runs, run_app


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One small grid (two learning rates, three epochs) on a tiny tree: its folder."""
    cwd = tmp_path_factory.mktemp("sweep")
    tree = make_tree(cwd / "tiles")
    proc = run_app(
        cwd,
        "-m",
        *FAST,
        "trainer.max_epochs=3",
        "data=imagefolder",
        f"data.root={tree}",
        "optimizer.lr=1e-3,1e-2",
    )
    (cwd / "sweep.stdout").write_text(proc.stdout)
    return cwd


def test_the_experiment_opens_on_its_runs_and_make_ui_prints_their_url(sweep):
    from resnet_sweep.tracking.store import runs_url

    experiment = client_for(sweep).get_experiment_by_name("resnet-sweep")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    assert runs_url(uri, "resnet-sweep") == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=resnet-sweep"
    )
    assert "no experiment 'other'" in runs_url(uri, "other")
    assert len(mlflow_runs(sweep).children) == 2
    # the sweep's last line: the same URL, on `make ui`'s address
    last = (sweep / "sweep.stdout").read_text().strip().splitlines()[-1]
    assert last == f"runs in MLflow (after `make ui`): {runs_url(uri, 'resnet-sweep')}"


def test_each_sweeps_end_makes_the_view_again_from_its_own_children(tmp_path):
    """The view tag is the last sweep's (its swept keys, its names' width), not the first one's."""
    import json

    from conftest import fresh_store
    from mlflow.tracking import MlflowClient

    from resnet_sweep.reports import shared_view

    fresh_store(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("views")

    def sweep(key: str, values: list[str], name: str) -> dict:
        parent = client.create_run(experiment_id, tags={"objective": "valid/loss"}, run_name="sweep")
        children = []
        for value in values:
            child = client.create_run(
                experiment_id, tags={"mlflow.parentRunId": parent.info.run_id}, run_name=f"{name}-{value}"
            )
            client.log_param(child.info.run_id, key, value)
            client.set_terminated(child.info.run_id)
            children.append(client.get_run(child.info.run_id))
        shared_view.refresh(client, client.get_run(parent.info.run_id), children)
        return json.loads(client.get_experiment(experiment_id).tags["mlflow.sharedViewState.resnet-sweep"])

    first = sweep("head.name", ["linear", "mlp_relu"], "r")
    assert first["selectedColumns"][0] == "params.`head.name`"
    second = sweep("optimizer.lr", ["1e-3", "1e-2"], "resnet50-mlp_relu-adamw-lr")
    assert (
        second["selectedColumns"][0] == "params.`optimizer.lr`"
        and "params.`head.name`" not in second["selectedColumns"]
    )
    assert second["columnWidths"] != first["columnWidths"]


def test_the_experiments_prepared_view_shows_the_swept_keys_and_the_objective_sorted_best_first(sweep):
    import json

    experiment = client_for(sweep).get_experiment_by_name("resnet-sweep")
    view = json.loads(experiment.tags["mlflow.sharedViewState.resnet-sweep"])
    runs = mlflow_runs(sweep)
    assert view["orderByKey"] == "metrics.`best/valid/loss`" and view["orderByAsc"] is True
    columns = view["selectedColumns"]
    assert columns[:4] == [
        "params.`optimizer.lr`",
        "metrics.`best/valid/loss`",
        "metrics.`best/valid/acc`",
        "metrics.`test/acc`",
    ]
    for column in columns:
        kind, key = column.split(".", 1)
        key = key.strip("`")
        if kind in ("metrics", "params"):
            assert all(key in getattr(r.data, kind) for r in runs.children), column
    longest = max(len(r.info.run_name) for r in runs.children)
    assert view["columnWidths"]["attributes.`Run Name`"] >= 7 * longest  # the full names, not `resnet18-line...`
    # the parent does not sort among its children: its summary of the best run under other names
    (parent,) = runs.parents
    assert "best/valid/loss" not in parent.data.metrics and "best_run/valid/loss" in parent.data.metrics


def test_children_are_coloured_by_the_learning_rate_log_it_as_log10_and_log_the_objective_first(sweep):
    children = mlflow_runs(sweep).children
    colours = {r.data.params["optimizer.lr"]: r.data.tags["mlflow.runColor"] for r in children}
    assert len(set(colours.values())) == 2 and all(c.startswith("#") and len(c) == 7 for c in colours.values())
    assert {r.data.params["optimizer.lr_log10"] for r in children} == {"-3", "-2"}
    for child in children:
        assert next(iter(child.data.metrics)) == "valid/loss"  # what MLflow's compare view plots by default


def test_the_best_runs_model_is_named_after_it_and_linked_to_its_best_epoch_and_test_metrics(sweep):
    import mlflow

    runs = mlflow_runs(sweep)
    parent = runs.parents[0]
    best = next(r for r in runs.children if r.info.run_id == parent.data.tags["best_run_id"])
    best_epoch = int(best.data.metrics["best_epoch"])
    assert best_epoch >= 1  # never-improved runs are not the best
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    (model,) = mlflow.search_logged_models(experiment_ids=[best.info.experiment_id], output_format="list")
    assert model.source_run_id == best.info.run_id
    assert model.name == best.info.run_name.replace(".", "p")
    linked = {m.key: m for m in model.metrics}
    assert {m.step for m in linked.values()} == {best_epoch}
    assert {"valid/loss", "valid/acc", "train/loss", "test/acc", "test/auroc", "best/valid/loss"} <= set(linked)
    assert linked["valid/loss"].value == best.data.metrics["best/valid/loss"]  # the best epoch's, not epoch 0's
    assert linked["test/acc"].value == best.data.metrics["test/acc"]
    # described (its page's Description), its test metrics on the run's data set (its *Datasets used*)
    note = model.tags["mlflow.note.content"]
    assert note.startswith("**Backbone weights: random. Not transfer learning")
    assert f"**{best.info.run_name}** at its best epoch {best_epoch}: resnet18 with a linear head" in note
    assert "In: float32 images N x 3 x 32 x 32" in note and "Out: P(b_class)" in note
    assert model.model_type == "binary classifier" and model.tags["weights_source"] == "random"
    (data,) = best.inputs.dataset_inputs
    on_data = {m.key for m in model.metrics if (m.dataset_name, m.dataset_digest) == ("tiles", data.dataset.digest)}
    assert on_data == {"test/acc", "test/loss", "test/auroc", "test/f1", "test/balanced_acc"}


def test_the_learning_curves_are_the_first_chart_of_a_runs_model_metrics_tab(sweep):
    """MLflow 3.17's run page sorts its chart sections by name, first by code point (String.sort),
    then case-insensitively (localeCompare) as charts arrive: the curves' image sorts first both ways."""
    from resnet_sweep.tracking.logged import CURVES_KEY

    client = client_for(sweep)
    for child in mlflow_runs(sweep).children:
        best_epoch = int(child.data.metrics["best_epoch"])
        images = [a.path for a in client.list_artifacts(child.info.run_id, "images")]
        assert any(p.startswith(f"images/{CURVES_KEY.replace('/', '~')}+step+{best_epoch}+") for p in images), images
        section = CURVES_KEY.rsplit("/", 1)[0]
        others = {k.rsplit("/", 1)[0] for k in child.data.metrics if "/" in k}
        assert all(section < o and section.lower() < o.lower() for o in others), sorted(others)


def test_metric_values_carry_no_float32_noise(sweep):
    client = client_for(sweep)
    runs = mlflow_runs(sweep)
    for run in runs.all:
        for key, value in run.data.metrics.items():
            assert value == float(f"{value:.6g}"), (run.info.run_name, key, value)
    for run in runs.children:
        for m in client.get_metric_history(run.info.run_id, "valid/loss"):
            assert m.value == float(f"{m.value:.6g}"), (run.info.run_name, m.step, m.value)


def test_params_describe_the_experiment_and_the_plumbing_is_in_tags(sweep):
    runs = mlflow_runs(sweep)
    child = runs.children[0]
    params = child.data.params
    for key in ("backbone.name", "head.name", "optimizer.lr", "optimizer.momentum", "trainer.batch_size", "seed"):
        assert key in params, key
    for key in params:
        assert not key.startswith(("tracking.", "trainer.resume", "data.cache_dir", "data.tile_store", "hpo_trial.")), (
            key
        )
        assert not key.endswith(("._target_", "._partial_")) and key not in ("run_name", "data.root"), key
        assert params[key] not in ("None", "{}", "[]"), key
    assert len(params) < 30
    tags = child.data.tags
    assert tags["optimizer"] == "sgd" and tags["scheduler"] == "none"
    assert int(tags["model.total_params"]) > int(tags["model.trainable_params"]) > 0
    assert tags["data_root"] == str(sweep / "tiles")
    assert not any(k.startswith("best/lr/") for k in child.data.metrics)


def test_each_run_has_a_short_description_of_what_ran_and_how_it_did(sweep):
    for child in mlflow_runs(sweep).children:
        note = child.data.tags["mlflow.note.content"]
        best_epoch = int(child.data.metrics["best_epoch"])
        assert child.info.run_name in note and "resnet18 with a linear head, sgd at lr" in note
        assert note.startswith("**Backbone weights: random. Not transfer learning")  # FAST: backbone.weights=none
        assert f"best epoch {best_epoch} of 3" in note
        assert f"acc {child.data.metrics['test/acc']:.3f}" in note and "AUROC" in note


def test_the_data_set_is_each_runs_input_with_its_digest_source_and_class_counts(sweep):
    import json

    digests = set()
    for child in mlflow_runs(sweep).children:
        (inp,) = child.inputs.dataset_inputs
        dataset = inp.dataset
        assert dataset.name == "tiles"
        assert json.loads(dataset.source)["uri"] == str(sweep / "tiles")
        tags = {t.key: t.value for t in inp.tags}
        assert tags["mlflow.data.context"] == "training"
        assert tags["train"] == "a_class 6, b_class 6" and tags["valid"] == tags["test"] == "a_class 3, b_class 3"
        digests.add(dataset.digest)
    assert len(digests) == 1 and len(digests.pop()) == 16  # the same files, the same digest


def test_the_sweeps_parent_run_holds_its_report_overrides_and_a_link_to_the_best_run(sweep):
    runs = mlflow_runs(sweep)
    (parent,) = runs.parents
    assert parent.data.params["optimizer.lr"] == "1e-3,1e-2"
    assert parent.data.params["trainer.max_epochs"] == "3"
    note = parent.data.tags["mlflow.note.content"]
    best_id = parent.data.tags["best_run_id"]
    assert note.startswith("**2 finished, 0 failed**")
    link = f"#/experiments/{parent.info.experiment_id}/runs/{best_id}?workflowType=machine_learning"
    assert f"[{parent.data.tags['best_run_name']}]({link})" in note  # the run's page in Model-training mode
    assert "|&nbsp;&nbsp;Backbone&nbsp;&nbsp;|" in note and "|&nbsp;&nbsp;Optimizer&nbsp;&nbsp;|" in note  # its tables
    assert "## Best run per backbone" in note
    assert "&nbsp;&nbsp;Valid loss (best epoch)&nbsp;&nbsp;" in note  # padded: MLflow's viewer has no cell padding
    client = client_for(sweep)
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/runs.csv", "report/test_acc_vs_lr.png", "report/learning_curves.png"} <= report
    assert (sweep / "multirun").exists()


def test_plots_are_readable_confusion_matrix_and_metrics_vs_lr_per_optimizer(sweep, tmp_path):
    from PIL import Image

    runs = mlflow_runs(sweep)
    client = client_for(sweep)
    child = runs.children[0]
    png = client.download_artifacts(child.info.run_id, "plots/confusion_matrix.png", str(tmp_path))
    assert min(Image.open(png).size) >= 700  # was 450 x 400
    parent = runs.parents[0]
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/acc_loss_vs_lr_by_optimizer.png" in report


def test_the_confusion_matrix_shows_counts_and_row_percentages_in_contrasting_colours():
    from resnet_sweep.tracking import plots

    fig = plots.confusion_matrix([[40, 3], [12, 45]], ["favourable", "unfavourable"], "run: test")
    texts = {t.get_text(): t.get_color() for t in fig.axes[0].texts}
    plots.close(fig)
    assert texts["40\n93.0%"] == "white" and texts["3\n7.0%"] == "black"
    assert set(texts) == {"40\n93.0%", "3\n7.0%", "12\n21.1%", "45\n78.9%"}


def test_a_study_gets_optunas_own_history_slice_importance_and_parallel_coordinate_plots():
    import optuna

    from hydra_plugins.resnet_sweep_optuna._study_runs import study_plots
    from resnet_sweep.tracking import plots

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(
        lambda t: (
            t.suggest_float("optimizer.lr", 1e-5, 1e-1, log=True)
            * (2 if t.suggest_categorical("head", ["a", "b"]) == "a" else 1)
        ),
        n_trials=6,
    )
    names = []
    for name, fig in study_plots(study, study.trials[0].distributions, "valid/loss"):
        names.append(name)
        plots.close(fig)
    assert names == ["optimization_history", "objective_vs_optimizer_lr", "param_importances", "parallel_coordinate"]


def _browser():
    """Headless Debian chromium through Selenium, or a one-line skip where there is none."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.e2e
def test_a_browser_on_mlflow_ui_sees_the_runs_the_report_the_models_best_epoch_and_the_plots(sweep, tmp_path):
    """`mlflow ui` on the sweep's store, driven by headless chromium: what a researcher sees.
    Screenshots go to $RESNET_SWEEP_SCREENSHOTS (default: the test's temporary folder)."""
    import contextlib
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import mlflow
    from conftest import server_env, wait_until_healthy

    from resnet_sweep.tracking.store import runs_url

    browser = _browser()
    shots = Path(os.environ.get("RESNET_SWEEP_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "mlflow-ui.log"
    db = f"sqlite:///{sweep / 'mlflow.db'}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_bin), "ui", "--backend-store-uri", db, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=sweep, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(ui, proc, log_path)
        runs = mlflow_runs(sweep)
        (parent,) = runs.parents
        best_id = parent.data.tags["best_run_id"]
        experiment_id = parent.info.experiment_id

        def page(url: str, *texts: str, shot: str, timeout: float = 90) -> str:
            browser.get(url)
            deadline = time.time() + timeout
            while True:
                for more in browser.find_elements("xpath", "//*[normalize-space(text())='Show more']"):
                    with contextlib.suppress(Exception):  # a long description is folded
                        more.click()
                body = browser.find_element("tag name", "body").text
                if all(t in body for t in texts) or time.time() > deadline:
                    break
                time.sleep(1)
            browser.save_screenshot(str(shots / f"{shot}.png"))
            missing = [t for t in texts if t not in body]
            assert not missing, f"{url}: {missing} not on the page ({shots / shot}.png)\n{body[:2000]}"
            return body

        # the printed URL, in a fresh browser, lands on the prepared view in Model-training mode (not the
        # GenAI overview): every child's full name, the swept LR and the objective with their values
        url = runs_url(db, "resnet-sweep", ui)
        names = [r.info.run_name for r in runs.children]
        values = [f"{r.data.metrics['best/valid/loss']:g}" for r in runs.children]
        body = page(url, parent.info.run_name, *names, "optimizer.lr", "best/valid/loss", *values, shot="runs")
        assert "/runs" in browser.current_url
        assert "Model registry" in body and "Evaluation runs" not in body, "not in Model-training mode"
        shown = set(
            browser.execute_script(
                "return [...document.querySelectorAll('.ag-row *')].map(e => getComputedStyle(e).backgroundColor)"
            )
        )
        colours = {child.data.tags["mlflow.runColor"] for child in runs.children}
        assert len(colours) == len(runs.children), colours  # distinct
        for child in runs.children:  # each child's own colour, as its dot beside its name
            hex_colour = child.data.tags["mlflow.runColor"]
            rgb = "rgb({}, {}, {})".format(*(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)))
            assert rgb in shown, (child.info.run_name, hex_colour, shown)
        # the parent run (in Model-training mode, as its link from the view): its description holds the
        # report's tables and the best run's link
        page(
            f"{ui}/#/experiments/{experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning",
            "2 finished, 0 failed",
            "Best run per backbone",
            "Valid loss (best epoch)",
            parent.data.tags["best_run_name"],
            shot="parent_run",
        )
        # the report's first table (the page's first: the description comes first) has the objective's column
        tables = browser.execute_script("return [...document.querySelectorAll('table')].map(t => t.innerText)")
        assert tables and "Backbone" in tables[0] and "Valid loss (best epoch)" in tables[0], tables[:1]
        # the breadcrumb's experiment page is the runs table, not a GenAI overview of traces
        crumb = browser.find_element(
            "xpath", f"//a[normalize-space(.)='resnet-sweep' and contains(@href, '/experiments/{experiment_id}')]"
        )
        crumb.click()
        deadline = time.time() + 30
        while "Run Name" not in browser.find_element("tag name", "body").text and time.time() < deadline:
            time.sleep(0.5)
        browser.save_screenshot(str(shots / "experiment_from_breadcrumb.png"))
        body = browser.find_element("tag name", "body").text
        assert browser.current_url.split("?")[0].endswith(f"/experiments/{experiment_id}/runs"), browser.current_url
        assert "Run Name" in body and "Detect issues" not in body
        # a child run (in Model-training mode, as the runs table links it): its description, its
        # dataset, its logged model
        best = next(r for r in runs.children if r.info.run_id == best_id)
        mlflow.set_tracking_uri(db)
        (model,) = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
        run_page = f"{ui}/#/experiments/{experiment_id}/runs/{best_id}"
        body = page(f"{run_page}?workflowType=machine_learning", "best epoch", "tiles", model.name, shot="child_run")
        assert "Backbone weights: random" in body and "Evaluation runs" not in body
        # its Model metrics tab: the learning curves (train and valid loss in one figure) come first
        from resnet_sweep.tracking.logged import CURVES_KEY

        section = CURVES_KEY.split("/")[0]
        page(f"{run_page}/model-metrics?workflowType=machine_learning", section, "best/valid", shot="child_metrics")
        body = browser.find_element("tag name", "body").text
        assert body.index(section) < min(body.index(s) for s in ("best/train", "best/valid", "test", "valid")), body
        deadline = time.time() + 60
        # (a thumbnail: MLflow shows log_image's copy scaled to 256 pixels, the full image on a click)
        find_curves = (
            "return [...document.querySelectorAll('img')].filter(i => i.naturalWidth >= 200 && "
            "decodeURIComponent(i.src).includes('images/' + arguments[0]))"
        )
        while not (curves := browser.execute_script(find_curves, CURVES_KEY.replace("/", "~"))):
            assert time.time() < deadline, browser.execute_script(
                "return [...document.querySelectorAll('img')].map(i => i.src.slice(0, 200) + ' ' + i.naturalWidth)"
            )
            time.sleep(1)
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", curves[0])
        browser.save_screenshot(str(shots / "child_metrics_curves.png"))
        # the model page: described, its data set, the best epoch's metrics (not epoch 0's)
        # (waited for with the key: the page may show the metric's name before its value)
        best_loss = f"{best.data.metrics['best/valid/loss']:g}"[:5]
        digest = best.inputs.dataset_inputs[0].dataset.digest
        body = page(
            f"{ui}/#/experiments/{experiment_id}/models/{model.model_id}?workflowType=machine_learning",
            "valid/loss",
            best_loss,
            f"at its best epoch {int(best.data.metrics['best_epoch'])}",
            f"tiles (#{digest})",
            shot="model",
        )
        assert "No description" not in body
        # the confusion matrix renders
        page(
            f"{ui}/#/experiments/{experiment_id}/runs/{best_id}/artifacts/plots/confusion_matrix.png",
            "confusion_matrix.png",
            shot="confusion_matrix",
        )
        images = browser.find_elements("css selector", "img")
        assert any(img.get_property("naturalWidth") >= 700 for img in images), "the confusion matrix did not render"
        # the sweep's dashboard opens in the artifact viewer and its plots render (offline: no network here);
        # a fresh page: MLflow's artifact list kept the child's when only the URL's #fragment changed
        browser.get("about:blank")
        page(
            f"{ui}/#/experiments/{experiment_id}/runs/{parent.info.run_id}/artifacts/dashboard.html"
            "?workflowType=machine_learning",
            "dashboard.html",
            shot="dashboard_frame",
        )
        deadline = time.time() + 60
        while not browser.find_elements("css selector", "iframe.mlflow-html-iframe") and time.time() < deadline:
            time.sleep(0.5)
        browser.switch_to.frame(browser.find_element("css selector", "iframe.mlflow-html-iframe"))
        while browser.execute_script("return document.body && document.body.dataset.rendered") != "true":
            assert time.time() < deadline, browser.find_element("tag name", "body").text[:2000]
            time.sleep(0.5)
        assert len(browser.find_elements("css selector", ".js-plotly-plot")) >= 3
        assert len(browser.find_elements("css selector", ".scatterlayer .point")) >= 2 * len(runs.children)
        browser.switch_to.default_content()
        browser.save_screenshot(str(shots / "dashboard.png"))
    finally:
        browser.quit()
        proc.terminate()
        proc.wait(timeout=30)
