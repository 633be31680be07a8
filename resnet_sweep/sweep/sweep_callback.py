"""The Hydra callback of every run and sweep (``hydra.callbacks`` in conf/train.yaml): pre-flight
checks, one MLflow parent run per grid sweep, and at the end the best run, its model and a summary."""

from __future__ import annotations

import atexit
import contextlib
import logging
from pathlib import Path

import mlflow
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from resnet_sweep.core import faults
from resnet_sweep.core.context import read_parent
from resnet_sweep.core.errors import exit_with, first_line
from resnet_sweep.core.redaction import redact, redact_files
from resnet_sweep.reports import shared_view
from resnet_sweep.sweep.preflight import check_store_and_folders, check_sweep, is_study, share_sweep_data
from resnet_sweep.tracking.abandoned import close_abandoned_sweeps
from resnet_sweep.tracking.hpo import find_study
from resnet_sweep.tracking.logged import log_model
from resnet_sweep.tracking.lookup import best_run, child_runs, downloaded_checkpoint, logged_models
from resnet_sweep.tracking.runs import FAILURE_TAG, set_parent
from resnet_sweep.tracking.store import existing_run, view_url
from resnet_sweep.tracking.sweep_dir import claim_sweep_dir, read_job_statuses
from resnet_sweep.training import devices

log = logging.getLogger(__name__)


class SweepCallback(Callback):
    """In ``-m`` mode: one MLflow parent run for the sweep (every job is its child; a finished job
    reused from an earlier sweep stays under that sweep's run and is recorded here); at the end, the
    full model of the best run (``tracking.log_model=best``), a summary line, and a non-zero exit if
    any job did not finish here."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.client: MlflowClient | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check_sweep(config)
        check_store_and_folders(config)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        hc = config.get("hydra")  # the job's hydra.* (Hydra's run_job passes the whole config)
        if hc is not None:
            if hc.output_subdir:
                redact_files(Path(hc.runtime.output_dir))
            if hc.mode == RunMode.MULTIRUN:
                redact_files(Path(hc.sweep.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_sweep(config, every_point=True)
        claim_sweep_dir(config)
        experiment_id = check_store_and_folders(config)
        share_sweep_data(config)
        devices.check_sweep_memory(config, config.hydra)  # k jobs per GPU that cannot fit: one line
        faults.install_handlers()
        faults.mark_sweep_process()
        if is_study(config):
            return  # the Optuna sweeper opens (or, on resume, reopens) the study's parent run
        self.client = MlflowClient()
        sweep_dir = str(config.hydra.sweep.dir)
        overrides = " ".join(config.hydra.overrides.task)
        run = self.client.create_run(
            experiment_id,
            run_name=f"sweep-{Path(sweep_dir).parent.name}-{Path(sweep_dir).name}",
            tags={
                "sweep": "true",
                "sweep_dir": sweep_dir,
                "hydra_overrides": redact(overrides),
                "objective": str(config.objective),
            },
        )
        self.parent_id = run.info.run_id
        self.client.log_batch(self.parent_id, params=[Param(k, v) for k, v in override_params(config).items()])
        set_parent(config, self.parent_id)
        atexit.register(self._abandon)
        close_abandoned_sweeps(
            self.client, experiment_id, parent_id=self.parent_id, overrides=overrides, own_dir=Path(sweep_dir)
        )
        log.info("MLflow parent run %s (%s)", self.parent_id, redact(config.tracking.uri))

    def _abandon(self) -> None:
        """The sweep stopped before on_multirun_end (a signal, a crash): do not leave the parent RUNNING."""
        if self.parent_id and self.client:
            stopped, fault = faults.stop_signal(), faults.stop_fault()
            with contextlib.suppress(Exception), faults.quiet(*faults.STORE_LOGGERS):
                reason = (
                    f"interrupted by {stopped}: re-run the same command to resume"
                    if stopped
                    else f"interrupted: {fault}"
                    if fault
                    else "sweep ended before all jobs returned"
                )
                self.client.set_tag(self.parent_id, FAILURE_TAG, redact(reason))
                self.client.set_terminated(self.parent_id, "KILLED" if stopped or fault else "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        redact_files(sweep_dir)
        study = is_study(config)
        if study:
            self.parent_id = read_parent(sweep_dir)  # the Optuna sweeper's (_study_runs.open_study_parent)
            self.client = MlflowClient()
        if not self.parent_id:
            return
        client = self.client
        objective = str(config.objective)
        if study:  # FAIL and PRUNED trials are part of a study: counted by the sweeper, no error
            best = best_run([r for r in self.children() if r.info.status == "FINISHED"], objective)
            self._record_best(config, best, objective)
            for key, value in override_params(config).items():  # a resumed study has them already
                with contextlib.suppress(Exception):
                    client.log_param(self.parent_id, key, value)
            self._report(config)
            client.set_terminated(self.parent_id, "FINISHED")
            self._print_url(config)
            return
        jobs = read_job_statuses(sweep_dir)
        by_status: dict[str, list[dict]] = {}
        for job in jobs:
            by_status.setdefault(job["status"], []).append(job)
        reused_ids = [j["run_id"] for j in by_status.get("reused", []) if j.get("run_id")]
        if reused_ids:
            client.set_tag(self.parent_id, "reused_run_ids", ",".join(reused_ids))
        runs = {r.info.run_id: r for r in self.children()}
        for run_id in reused_ids:
            if run_id not in runs and (run := existing_run(run_id)) is not None:
                runs[run_id] = run
        finished = [r for r in runs.values() if r.info.status == "FINISHED"]
        never = [r for r in finished if r.data.tags.get("never_improved") == "true"]
        incomplete = {k: v for k, v in by_status.items() if k not in ("finished", "reused")}
        best = best_run(finished, objective)
        self._record_best(config, best, objective, log_it=not incomplete)
        counts = {s: len(by_status.get(s, [])) for s in ("finished", "failed", "interrupted", "skipped", "reused")}
        for key, n in counts.items():
            client.log_metric(self.parent_id, f"runs_{key}", n)
        summary = (
            f"{counts['finished']} finished, {counts['failed']} failed"
            + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")
            + (f", {counts['skipped']} skipped (running elsewhere)" if counts["skipped"] else "")
            + (f", {counts['reused']} reused" if counts["reused"] else "")
        )
        if never:
            summary += f"; {len(never)} never improved on epoch 0 ({', '.join(r.info.run_name for r in never)})"
        problems = [j for s in ("failed", "interrupted", "skipped") for j in by_status.get(s, [])]
        if problems:
            summary += ": " + "; ".join(
                f"{j['name']} ({j.get('reason') or '?'})"
                if j["status"] == "failed"
                else f"{j['name']} ({j['status']}: {j.get('reason') or '?'})"
                for j in problems
            )
        client.set_tag(self.parent_id, "summary", redact(summary))
        self._report(config)
        client.set_terminated(self.parent_id, "FAILED" if problems else "FINISHED")
        atexit.unregister(self._abandon)
        if best is not None:
            log.info("best run: %s (%s = %.4f)", best.info.run_name, objective, best.data.metrics[f"best/{objective}"])
        if not problems:  # else the one line below says it
            print(redact(summary), flush=True)
        self._print_url(config)
        if problems:
            hint = (
                "; re-run the same command to resume" if "interrupted" in incomplete or "skipped" in incomplete else ""
            )
            exit_with(redact(summary) + hint)

    def _record_best(self, config, best, objective: str, log_it: bool = True) -> None:
        client = self.client
        if best is None:
            return
        client.set_tag(self.parent_id, "best_run_id", best.info.run_id)
        client.set_tag(self.parent_id, "best_run_name", best.info.run_name)
        # not best/<objective>: the parent would sort among its children on that column
        client.log_metric(self.parent_id, f"best_run/{objective}", best.data.metrics[f"best/{objective}"])
        for key in ("test/acc", "test/loss"):
            if key in best.data.metrics:
                client.log_metric(self.parent_id, f"best_run/{key}", best.data.metrics[key])
        if str(config.tracking.log_model) != "best":
            return
        if not log_it:
            log.warning(
                "best model not logged: not every job of this sweep finished here; re-run the same "
                "command once they have, and the best run's model is logged then"
            )
        elif not logged_models(best):
            try:
                log_best_model(best)
            except Exception as e:  # a full disk: the sweep's results stand, its summary is still due
                reason = redact(first_line(e))
                log.warning("the best run's model was not logged (%s); re-run the same command to log it", reason)

    def _report(self, config) -> None:
        """The sweep's report on its parent run (description, report/ artifacts); a report that
        cannot be made is a warning, never the sweep's failure."""
        from resnet_sweep.reports import report

        study = None
        if is_study(config):  # for Optuna's own plots in the dashboard
            name = self.client.get_run(self.parent_id).data.tags.get("optuna_study", "")
            study = find_study(name, config.hydra.sweeper.get("storage"))
        try:
            report.write(
                str(config.tracking.uri),
                None,
                self.parent_id,
                str(Path(str(config.hydra.sweep.dir)) / "report"),
                study=study,
            )
        except Exception as e:
            log.warning("the sweep's report was not made (%s); `resnet-sweep report` makes it later", first_line(e))
        try:  # the UI's prepared view of the experiment, the children's colours
            shared_view.refresh(self.client, self.client.get_run(self.parent_id), self.children())
        except Exception as e:
            log.warning("the MLflow UI's view of this sweep was not prepared (%s)", first_line(e))

    def _print_url(self, config) -> None:
        """The last line: where the UI shows the sweep (a tracking server's own address; for a store
        file, ``make ui``'s)."""
        uri = str(config.tracking.uri)
        ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        with contextlib.suppress(Exception):
            experiment = self.client.get_experiment(self.client.get_run(self.parent_id).info.experiment_id)
            where = "" if uri.startswith("http") else " (after `make ui`)"
            print(f"runs in MLflow{where}: {redact(view_url(ui, experiment))}", flush=True)

    def children(self):
        return child_runs(self.client, self.client.get_run(self.parent_id))


def override_params(config) -> dict[str, str]:
    """The sweep's command-line overrides as the parent run's params: ``optimizer.lr`` ->
    ``1e-3,1e-2``, ``head`` -> ``linear,mlp_relu`` (a leading ``+``/``~`` dropped)."""
    params = {}
    for override in config.hydra.overrides.task:
        key, sep, value = str(override).partition("=")
        if sep:
            params[key.lstrip("+~")] = redact(value)[:6000]
    return params


def log_best_model(run) -> None:
    """Rebuild the best child's model from its checkpoint and log it as an MLflow model there."""
    from resnet_sweep.training.models import load_checkpoint

    with downloaded_checkpoint(run) as path:
        classifier, ckpt = load_checkpoint(path)
    with mlflow.start_run(run_id=run.info.run_id):
        try:
            log_model(classifier, ckpt, run.info.run_name)
            mlflow.set_tag("model_logged", "best of sweep")
        except Exception:
            mlflow.end_run("FINISHED")  # the run's results stand (start_run would end it FAILED)
            raise
    log.info("logged the full model of the best run %s", run.info.run_name)
