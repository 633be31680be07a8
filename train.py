import sys

import hydra

from resnet_sweep.config.checks import check_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> float:
    from resnet_sweep.job import job_context, run_job  # torch, MLflow: only once the config is composed

    return run_job(cfg, job_context(cfg))


if __name__ == "__main__":
    check_overrides()
    try:
        main()
    except KeyboardInterrupt as e:  # a signal, or faults.Stopped: runs are marked KILLED
        from resnet_sweep.core import faults

        line = f"{e or 'interrupted'}: the running job kept its finished epochs; re-run the same command to resume"
        print(e if isinstance(e, faults.Stopped) else line, file=sys.stderr, flush=True)  # Stopped: a full disk...
        sys.exit(faults.exit_code(e))
