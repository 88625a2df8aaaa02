# One virtual environment in .venv; every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build this project is tested with (any other pin downloads a CUDA build).
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-slow test-slurm bench clean

setup: $(VENV)/.installed

# pip installs torch (it finds the local CPU build; uv does not look there), uv the rest: uv resolves
# and unpacks in parallel, 8 s here against 90 s for pip (2-core AMD EPYC). torch is named again so
# that uv keeps the installed build instead of resolving another; where uv cannot install, pip does.
# No bytecode is compiled up front: each module is compiled the first time a process imports it
# (see PYTEST below).
$(VENV)/.installed: pyproject.toml setup.py  # setup.py lists the packages (a new one needs a reinstall)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile uv
	$(PY) -m pip install --quiet --no-compile "$(TORCH_PIN)"
	$(PY) -m uv pip install --quiet --python $(PY) "$(TORCH_PIN)" -e ".[demo,dev,deploy]" \
		|| $(PY) -m pip install --quiet "$(TORCH_PIN)" -e ".[demo,dev,deploy]"
	touch $@

demo: setup
	$(VENV)/bin/kprune run

# The suite runs on every core (pytest-xdist). `make test` is the fast set (under 5 minutes on 2 cores,
# set-up included); `make test-slow` the end-to-end tests on real models, real data and real processes.
# Bytecode is written even where the environment says not to (PYTHONDONTWRITEBYTECODE): otherwise every
# worker and every process a test starts compiles torch and transformers again (seconds each).
PYTEST := PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n auto --dist worksteal

test: setup
	$(PYTEST) -m "not slow and not slurm"

test-slow: setup
	$(PYTEST) -m "slow and not slurm"

# Sweeps on a real one-node SLURM that the tests start (tests/slurm_cluster.py): as root, with
# `apt-get install slurm-wlm munge`; they skip (and say why) where it cannot start.
test-slurm: setup
	$(PY) -m pytest -q -rs -m slurm

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf outputs multirun .pytest_cache
