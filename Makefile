# Diff-In corpus pruning — developer entry points. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := openclipart-svg dataset-fashion-mnist libcairo2 chromium
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED := 1

.PHONY: help setup apt test test-all demo clean-demo constraints

help:
	@echo "make setup     venv in $(VENV) + Debian packages (idempotent, fast when done)"
	@echo "make demo      set up, build the OpenMoji corpus, run the pipeline into runs/demo/"
	@echo "make test      the default test suite (slow tests excluded)"
	@echo "make test-all  every test, slow ones included"
	@echo "make constraints  rewrite constraints.txt from $(VENV) (after changing a version there)"

setup: apt $(VENV)/.installed

# Debian packages: real corpora (openclipart, Fashion-MNIST), cairo for SVG rasterising,
# chromium for the report's headless-browser test.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# pyproject.toml states compatible ranges; constraints.txt pins the exact versions that are tested.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $@

# Every installed distribution at its version (local labels such as +cpu dropped: the CUDA
# build of the same version satisfies the pin too).
constraints:
	@{ echo "# Exact versions tested (make setup, CI, docker/Dockerfile.*): pip install -c constraints.txt ..."; \
	  echo "# Written by \`make constraints\` from $(VENV); pyproject.toml states the ranges."; \
	  $(BIN)/python -m pip freeze --all --exclude pip --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > constraints.txt

test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

data/openmoji/sizes.json: | setup
	$(BIN)/diffin data openmoji --out data/openmoji --overwrite

demo: setup data/openmoji/sizes.json
	$(BIN)/diffin run --config configs/demo.yaml --run-dir runs/demo
	$(BIN)/diffin report runs/demo

clean-demo:
	rm -rf runs/demo
