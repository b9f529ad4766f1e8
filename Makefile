# refusal-atlas: two commands on a fresh machine.
#   make repro   set up .venv and run the whole pipeline on the embedded demo model
#   make test    set up .venv and run the whole test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The demo pipeline never needs the network; real models set HF_HUB_OFFLINE=0 themselves.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup repro test test-fast bench ui clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch is pinned exactly (torch==2.13.0 in pyproject.toml) and installed by pip, which takes the local
	# CPU build here and the CUDA build on a GPU machine; uv then installs the rest and keeps that torch
	# (55 s instead of pip's 106 s, cold, on 2 cores). --compile-bytecode as pip does: with
	# PYTHONDONTWRITEBYTECODE set, every stage would otherwise recompile its imports (+5 s each).
	$(PY) -m pip install -q "$$(grep -o 'torch==[0-9.]*' pyproject.toml)" uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

repro: setup
	dvc repro
	@echo ""
	@echo "Done. Results:"
	@echo "  artifacts/          every stage's outputs (tracked in dvc.lock)"
	@echo "  dvc metrics show    the metrics;  dvc plots show  writes dvc_plots/index.html"
	@echo "  artifacts/report/report.html   the self-contained report"
	@echo "  make ui             browse the MLflow runs at http://127.0.0.1:5000"

test: setup
	pytest -q

test-fast: setup
	pytest -q -m "not slow" -x

bench: setup
	pytest -q -s -p no:cacheprovider tests/benchmarks -m bench

ui: setup
	refusal-atlas ui

clean:
	rm -rf artifacts mlflow.db mlartifacts dvc_plots
