"""What a job records: its MLflow run, lookups, the store, the sweep folder, figures, its side of an Optuna trial."""
