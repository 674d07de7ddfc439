# pi0_lightning: every target installs what it needs into .venv first (CPU torch on machines without CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test lint format demo bench-cpu bench-env clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test]'
	@# robosuite warns on every import unless a private macro file exists; its setup script is interactive
	$(PY) -c "import importlib.util, pathlib; pathlib.Path(importlib.util.find_spec('robosuite').origin).with_name('macros_private.py').touch()"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The main job. Until the RL loop lands: convert the openpi reference fixture (or build a tiny random model when
# ../shared is absent), load it, and run PI0 inference with a parity check against openpi's own outputs.
demo: $(STAMP)
	$(PY) -m pi0_lightning.demo --out runs/demo

# CPU timing of sample_actions / a training forward (prints a table; see BENCHMARKS.md)
bench-cpu: $(STAMP)
	$(PY) -m pi0_lightning.benchmarks.cpu

# LIBERO env steps/s through EnvPool, render every step vs only at chunk starts (see BENCHMARKS.md; ~10 min)
bench-env: $(STAMP)
	$(PY) -m pi0_lightning.benchmarks.env

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .ruff_cache
