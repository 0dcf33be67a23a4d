# `make demo` and `make test` each create .venv on first use and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Quieter pip; the registry mirror is configured machine-wide (pip config list).
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip

$(VENV)/.installed: setup.py | $(PY)
	$(PIP) install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.installed-dev: setup.py | $(PY)
	$(PIP) install $(PIP_FLAGS) -e '.[dev]'
	touch $@ $(VENV)/.installed

DEMO_WORKDIR := workdirs/demo

demo: $(VENV)/.installed
	rm -rf $(DEMO_WORKDIR)
	$(PY) -m t5x_lite.train --config configs/demo.py --workdir $(DEMO_WORKDIR)

test: $(VENV)/.installed-dev
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed-dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
