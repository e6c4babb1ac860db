# Developer and CI entry points. `make test` builds its own virtualenv on a fresh machine (CPU torch, Triton, test
# deps) and runs the suite; without a GPU the kernels run under Triton's CPU interpreter (tests/conftest.py sets it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0 is the CPU build on the dev/CI machines' local disk; triton matches the GPU machine's 3.6.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
SGLANG_SPEC ?= sglang==0.5.10.post1
PYTEST_WORKERS ?= 2

.PHONY: venv install test fuzz lint format demo gpu-check clean

$(STAMP): pyproject.toml setup.py Makefile tests/requirements-sglang-cpu.txt tests/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -c tests/constraints-cpu.txt '.[test]'
	# SGLang for the peer tests: the wheel without its CUDA pins, plus what its Python modules import.
	$(PY) -m pip install -q --no-deps "$(SGLANG_SPEC)"
	$(PY) -m pip install -q -c tests/constraints-cpu.txt -r tests/requirements-sglang-cpu.txt
	touch $@

venv: $(STAMP)

lint: venv
	$(PY) -m ruff check pat_sglang tests scripts _pat_sglang_autoload.py setup.py
	$(PY) -m ruff format --check pat_sglang tests scripts _pat_sglang_autoload.py setup.py

format: venv
	$(PY) -m ruff format pat_sglang tests scripts
	$(PY) -m ruff check --fix pat_sglang tests scripts

# The package is installed from a built wheel (not editable), so the .pth registration hook is the real one.
install: venv
	$(PY) -m pip install -q --no-deps --force-reinstall .

test: lint install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# The long fuzz (tests/test_fuzz.py under the "fuzz" Hypothesis profile; `make test` runs its short "ci" profile).
fuzz: install
	PAT_HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests/test_fuzz.py --hypothesis-show-statistics

# The main job on an embedded default: a multi-agent decode step through RadixCache, PatAttnBackend and SGLang's
# Triton backend (small under the interpreter on a CPU, full size on a GPU).
demo: install
	PYTHONPATH=tests $(PY) scripts/demo.py

# On a CUDA machine with torch and triton installed (the H200 box): the same suite on the GPU, plus a timing.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
