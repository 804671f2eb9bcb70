# Every target that needs Python depends on the virtual environment, which is
# created on first use: a clean clone needs no manual step.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run demo test test-extended lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The embedded stack: local Ray, MLflow UI, the REST API; submits the smoke job; Ctrl-C stops.
run: $(STAMP)
	$(BIN)/python -m api.stack

demo: $(STAMP)
	$(BIN)/python -m spark_core.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Fault-tolerance rehearsals (node loss, head restart, killed drivers): ~18 min on 2 slow cores.
test-extended: $(STAMP)
	$(BIN)/python -m pytest -m extended $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m spark_core.bench

clean:
	rm -rf $(VENV) .pytest_cache .sparkorch
