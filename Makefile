# Developer and CI entry points. `make test` builds its own virtualenvs on a fresh machine and runs the suite in each;
# without a GPU the kernels run under Triton's CPU interpreter (tests/conftest.py sets it).
#   .venv               CPU torch 2.13.0, Triton 3.6, SGLang 0.5.10.post1: the whole suite
#   .venv-sglang0523    torch 2.14.1, Triton 3.8, SGLang 0.5.23 (what it pins): the SGLang peer tests and the kernels
#   .venv-triton<V>     CPU torch 2.13.0 and Triton <V> for each V in TRITON_EXTRA: the kernel and wrapper tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0 is the CPU build on the dev/CI machines' local disk; triton matches the GPU machine's 3.6.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
SGLANG_SPEC ?= sglang==0.5.10.post1
PYTEST_WORKERS ?= 2

# SGLang 0.5.23 pins torch 2.14.1 (a CUDA build that runs on the CPU, on local disk with its nvidia wheels) and so
# Triton 3.8.
VENV_0523 ?= .venv-sglang0523
PY_0523 := $(VENV_0523)/bin/python
STAMP_0523 := $(VENV_0523)/.installed
TORCH_0523_SPEC ?= torch==2.14.1
TRITON_0523_SPEC ?= triton==3.8.0
SGLANG_0523_SPEC ?= sglang==0.5.23

# The other Triton releases pyproject.toml admits (3.6 and 3.8 are in the two SGLang environments).
TRITON_EXTRA ?= 3.7.0 3.9.0
TRITON_STAMPS := $(foreach v,$(TRITON_EXTRA),.venv-triton$(v)/.installed)

PEER_TESTS := tests/test_backend.py tests/test_paths.py tests/test_registration.py tests/test_traffic.py
KERNEL_TESTS := tests/test_kernels.py tests/test_wrapper.py

.PHONY: venv venv-0523 venv-triton install install-0523 install-triton test test-main test-0523 test-triton fuzz \
	lint format demo gpu-check clean

$(STAMP): pyproject.toml setup.py Makefile tests/requirements-sglang-cpu.txt tests/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -c tests/constraints-cpu.txt '.[test]'
	# SGLang for the peer tests: the wheel without its CUDA pins, plus what its Python modules import.
	$(PY) -m pip install -q --no-deps "$(SGLANG_SPEC)"
	$(PY) -m pip install -q -c tests/constraints-cpu.txt -r tests/requirements-sglang-cpu.txt
	touch $@

$(STAMP_0523): pyproject.toml setup.py Makefile tests/requirements-sglang0523-cpu.txt tests/constraints-sglang0523-cpu.txt
	$(PYTHON) -m venv $(VENV_0523)
	$(PY_0523) -m pip install -q --upgrade pip
	$(PY_0523) -m pip install -q -c tests/constraints-sglang0523-cpu.txt "$(TORCH_0523_SPEC)" "$(TRITON_0523_SPEC)"
	$(PY_0523) -m pip install -q -c tests/constraints-sglang0523-cpu.txt '.[test]'
	$(PY_0523) -m pip install -q --no-deps "$(SGLANG_0523_SPEC)"
	$(PY_0523) -m pip install -q -c tests/constraints-sglang0523-cpu.txt -r tests/requirements-sglang0523-cpu.txt
	touch $@

.venv-triton%/.installed: pyproject.toml setup.py Makefile tests/constraints-triton.txt
	$(PYTHON) -m venv .venv-triton$*
	.venv-triton$*/bin/python -m pip install -q --upgrade pip
	.venv-triton$*/bin/python -m pip install -q -c tests/constraints-triton.txt "$(TORCH_SPEC)" "triton==$*"
	.venv-triton$*/bin/python -m pip install -q -c tests/constraints-triton.txt '.[test]'
	touch $@

venv: $(STAMP)
venv-0523: $(STAMP_0523)
venv-triton: $(TRITON_STAMPS)

lint: venv
	$(PY) -m ruff check pat_sglang tests scripts _pat_sglang_autoload.py setup.py
	$(PY) -m ruff format --check pat_sglang tests scripts _pat_sglang_autoload.py setup.py

format: venv
	$(PY) -m ruff format pat_sglang tests scripts
	$(PY) -m ruff check --fix pat_sglang tests scripts

# The package is installed from a built wheel (not editable), so the .pth registration hook is the real one.
install: venv
	$(PY) -m pip install -q --no-deps --force-reinstall .

install-0523: venv-0523
	$(PY_0523) -m pip install -q --no-deps --force-reinstall .

install-triton: venv-triton
	for v in $(TRITON_EXTRA); do .venv-triton$$v/bin/python -m pip install -q --no-deps --force-reinstall . || exit 1; done

test-main: lint install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# The long fuzz (tests/test_fuzz.py under the "fuzz" Hypothesis profile; `make test` runs its short "ci" profile).
fuzz: install
	PAT_HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests/test_fuzz.py --hypothesis-show-statistics

test-0523: install-0523
	$(PY_0523) -m pytest -q -n $(PYTEST_WORKERS) $(PEER_TESTS) $(KERNEL_TESTS)

test-triton: install-triton
	for v in $(TRITON_EXTRA); do echo "== Triton $$v"; \
		.venv-triton$$v/bin/python -m pytest -q -n $(PYTEST_WORKERS) $(KERNEL_TESTS) || exit 1; done

# Every environment; stops at the first that fails.
test: test-main test-0523 test-triton

# The main job on an embedded default: a multi-agent decode step through RadixCache, PatAttnBackend and SGLang's
# Triton backend (small under the interpreter on a CPU, full size on a GPU).
demo: install
	PYTHONPATH=tests $(PY) scripts/demo.py

# On a CUDA machine with torch and triton installed (the H200 box): the same suite on the GPU, plus a timing.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) $(VENV_0523) .venv-triton* build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
