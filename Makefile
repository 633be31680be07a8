# resnet-sweep: `make demo`, `make test`, `make ui`. Every target creates .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint format ui screenshots server bench bench-data clean

setup: $(STAMP)

# Idempotent: reinstalls only when pyproject.toml changes (or the venv is missing). tools/install.py
# installs with uv (about 25 s instead of pip's 80 s, with pip's indexes and constraints), falling
# back to pip; INSTALL_ARGS=--pip for pip only.
INSTALL_ARGS ?=
$(STAMP): pyproject.toml tools/install.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python tools/install.py $(INSTALL_ARGS)
	touch $(STAMP)

# The main job on the embedded demo data: 2 backbones x 2 learning rates, one MLflow parent run.
demo: setup
	$(BIN)/python train.py -m experiment=demo

# The whole suite, both layers (in-process and e2e: real processes, PostgreSQL included), in parallel
# on every core (pytest-xdist, see [tool.pytest.ini_options]); what CI runs.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (lint + format check) and the import layers (import-linter, contracts in pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The in-process layer only: without the end-to-end tests (real processes: signals, launchers,
# servers) and those marked slow (the VGG16, ConvNeXt and Inception runs).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not e2e" $(PYTEST_ARGS)

# MLflow UI on the default store, bound to this machine only; prints the URL of the experiment's runs
# page in Model-training mode, on the view the last sweep prepared (docs/results.md#the-ui).
EXPERIMENT ?= resnet-sweep
UI_PORT ?= 5000
ui: setup
	@$(BIN)/python -c "from resnet_sweep.tracking.store import runs_url; \
		print('runs of $(EXPERIMENT):', runs_url('sqlite:///mlflow.db', '$(EXPERIMENT)', 'http://127.0.0.1:$(UI_PORT)'))"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# Screenshots of the MLflow UI on a small sweep (runs page, parent run, child run, model page,
# confusion matrix) into screenshots/: the browser test of tests/test_mlflow_ui.py (headless
# chromium + chromium-driver from apt, selenium from the dev extras).
screenshots: setup
	RESNET_SWEEP_SCREENSHOTS=$(CURDIR)/screenshots $(BIN)/python -m pytest -q -n 0 tests/test_mlflow_ui.py -k browser

# MLflow tracking server for several sweeps or machines: PostgreSQL backend store when
# MLFLOW_BACKEND_STORE_URI=postgresql://user@dbhost:5432/mlflow is set (password from PGPASSWORD or
# ~/.pgpass, never in the URL), else sqlite:///mlflow.db. Artifacts go to ./mlartifacts (or
# MLFLOW_ARTIFACTS_DESTINATION) and are uploaded and downloaded through the server.
# HOST=0.0.0.0 to reach it from other machines (then also ALLOWED_HOSTS=name:port,...).
HOST ?= 127.0.0.1
PORT ?= 5000
WORKERS ?= 2
server: setup
	$(BIN)/mlflow server --host $(HOST) --port $(PORT) --workers $(WORKERS) \
		--backend-store-uri "$${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}" \
		--serve-artifacts --artifacts-destination "$${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}" \
		$(if $(ALLOWED_HOSTS),--allowed-hosts "$(ALLOWED_HOSTS)")

# Naive loop vs feature bank on the study's ResNet18 perceptron grid (about 15 minutes on 2 cores),
# then the data path: tile store vs PIL decoding beside the model's own limit (about 4 minutes).
bench: setup
	$(BIN)/python benchmarks/bench_feature_bank.py
	$(BIN)/python benchmarks/bench_data_path.py

bench-data: setup
	$(BIN)/python benchmarks/bench_data_path.py

clean:
	rm -rf outputs multirun .pytest_cache
