"""A sweep's report, figures, dashboard and the UI's prepared view, from what MLflow holds."""
