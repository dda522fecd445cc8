# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the default math recipe on the embedded tiny model
#   make test   create .venv, install with the dev extra, run the test suite
# PYTHON picks the interpreter for the venv; pip's own environment (find-links to the CPU torch
# wheel on this project's machines) is used as it is.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test install install-dev lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-base

install: $(VENV)/.installed-base
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/python -m recipes.math_reft --config recipes/configs/math_reft_tiny.yaml $(DEMO_ARGS)

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
