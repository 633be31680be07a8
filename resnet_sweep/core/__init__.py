"""Foundations with no torch, MLflow or Optuna: one-line errors, faults and signals, sealed cache folders, redaction, keyed draws."""
