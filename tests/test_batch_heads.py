"""trainer.batch_heads: the heads of a sweep's jobs trained together compute what each computes alone."""

from __future__ import annotations

import copy
import io
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from conftest import FAST, TRAIN_PY, client_for, compose_cfg, fresh_store, make_tree, mlflow_runs, run_app
from PIL import Image
from torch import nn

from resnet_sweep.training.head_stack import _binary_valid
from resnet_sweep.training.metrics import Meter, criterion
from resnet_sweep.training.models import Head
from resnet_sweep.training.stacked_heads import StackedHeads, StackedOptimizer

OPTIMIZERS = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.8, nesterov=True, dampening=0.0),
    "sgd_plain": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr, weight_decay=1e-2),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, betas=(0.8, 0.99)),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_stacked_optimizer_steps_each_head_as_torch_steps_it_alone(kind):
    torch.manual_seed(0)
    lrs = [1e-3, 3e-2, 1e-1]
    heads = [Head(6, hidden=5, activation=nn.ReLU(), out_features=1) for _ in lrs]
    alone = [copy.deepcopy(h) for h in heads]
    optimizers = [OPTIMIZERS[kind](h.parameters(), lr) for h, lr in zip(alone, lrs)]
    stack = StackedHeads(heads, torch.device("cpu"))
    stacked = StackedOptimizer(stack, [OPTIMIZERS[kind](h.parameters(), lr) for h, lr in zip(heads, lrs)])
    updates = [[True, True, True], [True, False, True], [False, True, True], [True, True, False]] * 2
    for update in updates:
        x, y = torch.randn(3, 4, 6), torch.randint(0, 2, (3, 4)).float()
        for k, (head, opt) in enumerate(zip(alone, optimizers)):
            if update[k]:
                loss = nn.functional.binary_cross_entropy_with_logits(head(x[k]).squeeze(-1), y[k])
                loss.backward()
                opt.step()
                opt.zero_grad()
        logits = stack.forward(x).squeeze(-1)
        nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1).sum().backward()
        stacked.step(torch.tensor(update))
    for k, head in enumerate(alone):
        for p, q in zip(head.parameters(), stack.params):
            assert torch.allclose(p, q[k], atol=1e-6, rtol=1e-5), (kind, k)
    # head 1's state goes back into a torch optimizer: the same state_dict as the one that ran alone
    probe = copy.deepcopy(alone[1])
    opt = OPTIMIZERS[kind](probe.parameters(), lrs[1])
    stacked.store(1, opt)
    for mine, theirs in zip(opt.state_dict()["state"].values(), optimizers[1].state_dict()["state"].values()):
        for key in theirs:
            assert torch.allclose(torch.as_tensor(mine[key]).float(), torch.as_tensor(theirs[key]).float(), atol=1e-6)


def test_each_head_draws_its_own_dropout_masks_as_it_would_alone():
    torch.manual_seed(0)
    heads = [Head(6, hidden=5, activation=nn.LeakyReLU(), dropout=0.5) for _ in range(3)]
    stack = StackedHeads(heads, torch.device("cpu"))
    states = [torch.Generator().manual_seed(s).get_state() for s in (0, 1, 2)]
    x = torch.randn(3, 7, 6)
    out = stack.forward(x, dropout=states)
    for k, head in enumerate(heads):
        torch.manual_seed(k)
        head.train()
        assert torch.allclose(head(x[k]), out[k], atol=1e-6)
        assert torch.equal(states[k], torch.get_rng_state())  # the stream continues where it would


def test_vectorised_validation_metrics_equal_the_meter_batch_by_batch():
    torch.manual_seed(0)
    y = torch.randint(0, 2, (37,))
    logits = torch.randn(3, 37) * 3
    logits[2, :8] = torch.rand(8) * 0.9  # a whole first batch in [0, 1]: torchmetrics reads it as probabilities
    got = _binary_valid(logits, y, batch=8)
    for k in range(3):
        meter = Meter(torch.device("cpu"), 2, full=True)
        for start in range(0, 37, 8):
            part = logits[k, start : start + 8]
            meter.update(criterion(2)(part, y[start : start + 8].float()), part, y[start : start + 8])
        want = meter.compute("valid")
        for key, value in want.items():
            assert got[k][key] == pytest.approx(value, abs=1e-6), (k, key)


def sweep(tmp_path, tree, cache, mode, *grid, check=True):
    return run_app(
        tmp_path,
        "-m",
        *FAST,
        "data=imagefolder",
        f"data.root={tree}",
        f"data.cache_dir={cache}",
        "trainer.precision=32",
        "trainer.bank_views=3",
        f"trainer.batch_heads={mode}",
        *grid,
        check=check,
    )


def curves(cwd):
    client = client_for(cwd)
    out = {}
    for run in mlflow_runs(cwd).children:
        p = run.data.params
        key = (p["optimizer._target_"] if "optimizer._target_" in p else run.data.tags["optimizer"], p["head.name"])
        key += (p["seed"], p["trainer.batch_size"], p["optimizer.lr"])
        history = sorted(client.get_metric_history(run.info.run_id, "valid/loss"), key=lambda m: m.step)
        out[key] = (run, [m.value for m in history])
    return out


def best_checkpoint(cwd, run_id) -> dict:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="checkpoint/best.pt",
        tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}",
        dst_path=str(cwd / "downloaded"),
    )
    return torch.load(path, weights_only=True)


def test_grouped_jobs_give_the_numbers_they_give_alone(tmp_path):
    """SGD, Adam and AdamW; the linear head and the dropout MLP (a linear layer, an activation,
    dropout, a linear layer); two seeds (two banks: random weights) and two batch sizes (one leaving a
    partial batch), in one sweep: per-epoch valid losses, best epoch, test figures and checkpoint as
    when each job trains alone (fp32)."""
    tree = make_tree(tmp_path / "tiles", per_class=(12, 6, 6))
    grid = [
        "optimizer=sgd,adam,adamw",
        "head=linear,mlp_leakyrelu_dropout",
        "seed=0,1",
        "trainer.batch_size=8,5",
        "optimizer.lr=0.01",
        "trainer.max_epochs=2",
        "trainer.patience=1",
    ]
    (tmp_path / "grouped").mkdir()
    (tmp_path / "alone").mkdir()
    together = sweep(tmp_path / "grouped", tree, tmp_path / "cache", "auto", *grid)
    assert "training 24 heads together" in together.stderr + together.stdout
    sweep(tmp_path / "alone", tree, tmp_path / "cache", "off", *grid)
    grouped, alone = curves(tmp_path / "grouped"), curves(tmp_path / "alone")
    assert len(grouped) == len(alone) == 24
    for key, (run, losses) in grouped.items():
        other, reference = alone[key]
        assert losses == pytest.approx(reference, abs=1e-4), key
        assert run.data.metrics["best_epoch"] == other.data.metrics["best_epoch"], key
        for metric in ("test/loss", "test/acc", "test/auroc"):
            assert run.data.metrics[metric] == pytest.approx(other.data.metrics[metric], abs=1e-4), (key, metric)
        assert run.info.status == "FINISHED"
    client = client_for(tmp_path / "grouped")
    for run, _ in grouped.values():  # drawn by a worker process while the group went on
        plots = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "plots")}
        assert set(plots) == {"plots/learning_curves.png", "plots/confusion_matrix.png"}, plots
        assert all(size > 10_000 for size in plots.values()), plots
    # the checkpoints: the same head weights
    some = sorted(grouped)[::7]
    for key in some:
        a, b = (
            best_checkpoint(tmp_path / mode, runs[key][0].info.run_id)
            for mode, runs in (("grouped", grouped), ("alone", alone))
        )
        assert a["epoch"] == b["epoch"]
        for name, tensor in a["state"].items():
            assert torch.allclose(tensor, b["state"][name], atol=1e-5), (key, name)


def test_a_diverging_head_fails_alone(tmp_path):
    tree = make_tree(tmp_path / "tiles")
    proc = sweep(
        tmp_path, tree, tmp_path / "cache", "auto", "optimizer.lr=0.01,1e38", "trainer.max_epochs=3", check=False
    )
    assert proc.returncode == 1
    runs = {r.data.params["optimizer.lr"]: r for r in mlflow_runs(tmp_path).children}
    assert runs["0.01"].info.status == "FINISHED"
    assert runs["0.01"].data.metrics["epochs_run"] == 3
    assert runs["1e+38"].info.status == "FAILED"
    assert runs["1e+38"].data.tags["failure_reason"].startswith("loss became"), runs["1e+38"].data.tags


def resume_epochs(cwd) -> list[int]:
    epochs = []
    for path in (cwd / ".resnet-sweep" / "resume").glob("*.pt"):
        try:
            epochs.append(int(torch.load(path, weights_only=True).get("epoch") or -1))
        except Exception:  # being replaced right now
            epochs.append(-1)
    return epochs


@pytest.mark.e2e
def test_sigkill_during_a_group_then_the_same_command_resumes_each_job_at_its_epoch(tmp_path):
    tree = make_tree(tmp_path / "tiles")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir(), clean.mkdir()
    args = [
        "-m",
        *FAST,
        "data=imagefolder",
        f"data.root={tree}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "backbone.weights=none",
        "trainer.precision=32",
        "trainer.max_epochs=15",
        "trainer.patience=null",
        "optimizer=adam",
        "optimizer.lr=1e-3,1e-2,1e-1",
    ]
    fresh_store(killed)
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), *args],
        cwd=killed,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            epochs = resume_epochs(killed)
            if len(epochs) == 3 and min(epochs) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert max(resume_epochs(killed)) < 15
    before = {r.data.params["optimizer.lr"]: r.info.run_id for r in mlflow_runs(killed).children}

    out = run_app(killed, *args)
    assert out.stdout.count("resuming MLflow run") + out.stderr.count("resuming MLflow run") == 3
    run_app(clean, *args)
    runs, reference = mlflow_runs(killed).children, mlflow_runs(clean).children
    assert len(runs) == 3 and {r.data.params["optimizer.lr"]: r.info.run_id for r in runs} == before
    client, ref_client = client_for(killed), client_for(clean)
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "valid/loss")
        assert sorted(m.step for m in history) == list(range(16)), "every epoch once"
        ref = next(r for r in reference if r.data.params["optimizer.lr"] == run.data.params["optimizer.lr"])
        want = ref_client.get_metric_history(ref.info.run_id, "valid/loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [m.value for m in sorted(want, key=lambda m: m.step)], abs=1e-5
        )
        assert run.data.metrics["test/loss"] == pytest.approx(ref.data.metrics["test/loss"], abs=1e-5)


def test_an_optuna_batch_trains_together_and_prunes_one_trial_alone(tmp_path):
    """lr 1e6 separates the tiny tiles at once (valid loss 0 at epoch 1): pruned below 0.3."""
    tree = make_tree(tmp_path / "tiles")
    proc = run_app(
        tmp_path,
        "-m",
        *FAST,
        "data=imagefolder",
        f"data.root={tree}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=3",
        "hydra.sweeper.storage=sqlite:///optuna.db",
        "hydra.sweeper.study_name=batch",
        "optimizer.lr=choice(1e-3, 1e-2, 1e6)",
        "trainer.max_epochs=3",
        "trainer.patience=null",
        "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.3,n_warmup_steps:0}",
    )
    assert "training 3 heads together" in proc.stdout + proc.stderr
    import optuna

    trials = optuna.load_study(study_name="batch", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    states = {t.params["optimizer.lr"]: t.state.name for t in trials}
    assert states == {1e-3: "COMPLETE", 1e-2: "COMPLETE", 1e6: "PRUNED"}, states
    runs = {r.data.params["optimizer.lr"]: r for r in mlflow_runs(tmp_path).children}
    assert runs["1000000.0"].data.tags["optuna_state"] == "PRUNED"
    for lr in ("0.001", "0.01"):
        assert runs[lr].info.status == "FINISHED" and runs[lr].data.metrics["epochs_run"] == 3
        steps = [m.step for m in client_for(tmp_path).get_metric_history(runs[lr].info.run_id, "valid/loss")]
        assert sorted(steps) == [0, 1, 2, 3]


def compose_job(*overrides):
    return compose_cfg(*overrides)


def test_a_figure_drawn_by_a_worker_is_the_one_drawn_here():
    from resnet_sweep.tracking.drawing import Drawing

    epochs = [
        {"train/loss": 0.7 - e / 20, "valid/loss": 0.8 - e / 30, "train/acc": 0.5, "valid/acc": 0.6} for e in range(4)
    ]
    args = (epochs, 2, "resnet18-linear-sgd-lr1e-03-s0")
    worker = Drawing("learning_curves", args, background=True)
    assert worker.future is not None
    here = Image.open(io.BytesIO(Drawing("learning_curves", args).png()))
    drawn = Image.open(io.BytesIO(worker.png()))  # bytes may differ: this process's matplotlib state
    assert drawn.format == "PNG" and drawn.size == here.size
    assert len(drawn.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50  # lines, text: not blank


def test_a_job_waiting_for_its_figures_gives_the_turn_to_the_others():
    """``head_group.wait_until``: a job of a group that waits (for a figure being drawn) lets the
    next jobs run meanwhile; alone, it returns at once."""
    from resnet_sweep.training.head_group import HeadGroup, wait_until

    order = []
    flag = {"set": False}

    def waits():
        order.append("a starts")
        wait_until(lambda: flag["set"])
        order.append("a goes on")
        return "a"

    def sets():
        order.append("b runs")
        flag["set"] = True
        return "b"

    assert HeadGroup().run([waits, sets]) == ["a", "b"]
    assert order == ["a starts", "b runs", "a goes on"]
    wait_until(lambda: False)  # not in a group: returns


def test_jobs_group_by_their_bank_and_the_rest_train_alone():
    from resnet_sweep.training.head_group import partition

    configs = [
        compose_job("optimizer.lr=1e-3"),
        compose_job("optimizer=adam", "head=mlp_relu", "seed=3", "trainer.batch_size=16"),  # same bank
        compose_job("backbone.freeze=none"),  # fine-tuning: no bank
        compose_job("trainer.batch_heads=off"),
        compose_job("backbone=resnet34"),  # another bank
        compose_job("backbone=resnet34", "optimizer.lr=1e-2"),
        compose_job("trainer.feature_bank=off"),
        compose_job("optimizer._target_=torch.optim.RMSprop"),  # no stacked twin
    ]
    assert partition(configs) == [[0, 1], [2], [3], [4, 5], [6], [7]]


@pytest.mark.e2e
def test_the_sweep_bench_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_sweep.py --smoke: the real train.py -m, grouped and one job at a time."""
    from conftest import REPO

    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_sweep.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("batch_heads=auto: 4 runs in", "batch_heads=off:  2 runs in", "4 runs in", "speed-up end to end"):
        assert line in proc.stdout, proc.stdout
