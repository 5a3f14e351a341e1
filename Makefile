# The two commands: `make demo` (the main job) and `make test` (lint, type-check, tests).
# Each creates .venv and installs what it needs the first time.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine kind has a local CPU wheel of this exact version; asking for plain `torch` pulls GBs of CUDA.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow lint bench bench-compile clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $@

# The official packages are the parity reference; --no-deps because their torchvision import is stubbed
# in tests/official.py (there is no CPU torchvision for this torch).
$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps segment_anything==1.0 segment_anything_hq==0.3
	touch $@

demo: $(VENV)/.base
	$(BIN)/finesam demo

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright --pythonpath $(BIN)/python

test: lint
	$(BIN)/pytest

test-slow: $(VENV)/.test
	$(BIN)/pytest -m slow

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_sam.py
	$(BIN)/python benchmarks/bench_hq.py
	$(BIN)/python benchmarks/bench_loading.py --size vit_b
	$(BIN)/python benchmarks/bench_memory.py --size vit_b --count 20
	$(BIN)/python benchmarks/bench_amg.py --size vit_b --points-per-side 8 --repeats 2

# compiled mode: two ViT-B compilations, ~8 minutes on 2 cores
bench-compile: $(VENV)/.test
	$(BIN)/python benchmarks/bench_compile.py --size vit_b

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
