# Quick start: `make demo` (end-to-end run on simulated data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: the CPU wheel; an unpinned torch could pull GBs of CUDA packages.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[tests]" ruff
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m scale_scvi.demo --output scale_demo_output

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf scale_demo_output docs/_build .pytest_cache
