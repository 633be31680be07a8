"""A sweep's pre-flight checks and its Hydra callback (parent run, best run, summary, report)."""
