# The two commands: `make demo` (the main job) and `make test` (lint, type-check, tests).
# Each creates .venv and installs what it needs the first time.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine kind has a local CPU wheel of this exact version; asking for plain `torch` pulls GBs of CUDA.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $@

# The official packages are the parity reference; --no-deps because their torchvision import is stubbed
# in reference/official.py (there is no CPU torchvision for this torch).
$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps segment_anything==1.0 segment_anything_hq==0.3
	$(BIN)/pip install --quiet setuptools wheel
	SAM2_BUILD_CUDA=0 $(BIN)/pip install --quiet --no-deps --no-build-isolation sam2==1.1.0
	$(BIN)/pip install --quiet --no-deps efficientsam==1.0.0
	# the third-party ONNX runner of tests/test_onnx_interfaces.py: its opencv-python would replace the headless one
	$(BIN)/pip install --quiet --no-deps segment-anything-onnx==0.0.5
	touch $@

demo: $(VENV)/.base
	$(BIN)/finesam demo

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright --pythonpath $(BIN)/python
	$(BIN)/lint-imports  # the layer graph of docs/architecture.md ([tool.importlinter] in pyproject.toml)

test: lint
	$(BIN)/pytest

test-slow: $(VENV)/.test
	$(BIN)/pytest -m slow

# every speed figure against the official implementation, one table (ViT-B: ~15 minutes on 2 cores, with the
# compiled mode), then automatic mask generation and the encoders with reuse_freed_memory(); `make bench SIZE=vit_h`
# for ViT-H
SIZE ?= vit_b
bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench.py --size $(SIZE) --compile
	$(BIN)/python benchmarks/bench_amg.py --size $(SIZE) --points-per-side 8 --repeats 2
	$(BIN)/python benchmarks/bench_allocator.py --sizes $(SIZE),vit_tiny

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache .grimp_cache
