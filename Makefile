# Developer and CI entry points. `make test` builds its own virtualenv on a fresh machine (CPU torch, Triton, test
# deps) and runs the suite; without a GPU the kernels run under Triton's CPU interpreter (tests/conftest.py sets it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0 is the CPU build on the dev/CI machines' local disk; triton matches the GPU machine's 3.6.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PYTEST_WORKERS ?= 2

.PHONY: venv test lint format gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

lint: venv
	$(PY) -m ruff check pat_sglang tests scripts
	$(PY) -m ruff format --check pat_sglang tests scripts

format: venv
	$(PY) -m ruff format pat_sglang tests scripts
	$(PY) -m ruff check --fix pat_sglang tests scripts

test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# On a CUDA machine with torch and triton installed (the H200 box): the same suite on the GPU, plus a timing.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
