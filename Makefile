# Quick start: `make demo` (end-to-end run on simulated data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs tutorials bench clean

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

# The docs extra on top of the same venv (torch==2.13.0 is already installed by $(STAMP)).
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q torch==2.13.0 -e ".[docs]"
	touch $(DOCS_STAMP)

# Notebooks are stored with their outputs and not executed. Warnings are errors; the
# autosummary pages are written afresh, so that a page an older API listed does not linger.
docs: $(DOCS_STAMP)
	rm -rf docs/generated
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html
	@echo "Open docs/_build/html/index.html"

# Re-run the tutorials in place to refresh their stored outputs (needs the labeled data in
# $$SCALE_SCVI_DATA, default ../shared/data; about half an hour on two CPU cores).
tutorials: $(DOCS_STAMP)
	cd docs/tutorials && for nb in forebrain multiome reference_mapping; do \
		../../$(BIN)/jupyter-execute --inplace --timeout=3600 $$nb.ipynb || exit 1; done
	rm -rf docs/tutorials/*_model docs/tutorials/*_cli docs/tutorials/*.h5ad

# Benchmarks against the original SCALE (own venv, benchmarks/.venv-scale), SnapATAC2 (own
# venv, benchmarks/.venv-snapatac2), PeakVI and LSI, on the matrices as shipped;
# writes benchmarks/results/*.csv, *.png and benchmarks/RESULTS.md. Hours on a small CPU.
BENCH_SEEDS ?= 0 1 2
bench: $(STAMP)
	$(BIN)/python benchmarks/run_quality.py --seeds $(BENCH_SEEDS)
	$(BIN)/python benchmarks/run_speed.py --repeats 2 --threads 0 1
	$(BIN)/python benchmarks/run_scaling.py --cells 10000 50000 100000
	$(BIN)/python benchmarks/report.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf scale_demo_output docs/_build docs/generated docs/_generated .pytest_cache
