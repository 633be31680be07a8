# resnet-sweep: `make demo`, `make test`, `make ui`. Every target creates .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-all ui bench clean

setup: $(STAMP)

# Idempotent: reinstalls only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded demo data: 2 backbones x 2 learning rates, one MLflow parent run.
demo: setup
	$(BIN)/python train.py -m experiment=demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest

# MLflow UI on the default store, bound to this machine only.
ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# Naive loop vs feature bank on the study's ResNet18 perceptron grid (about 15 minutes on 2 cores).
bench: setup
	$(BIN)/python benchmarks/bench_feature_bank.py

clean:
	rm -rf outputs multirun .pytest_cache
