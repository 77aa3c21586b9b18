# Two commands matter: `make run` (the main job) and `make test` (the whole suite).
# Both build .venv from nothing on a machine that has only Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: run test install model lint bench bench-quant bench-quality bench-prune bench-serve bench-structured bench-llamacpp bench-sizes bench-dist bench-kv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a loose spec would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]' $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/miaotui pull smollm2-135m

run: model
	$(BIN)/miaotui demo

test: model
	$(BIN)/ruff check miaotui tests benchmarks
	$(BIN)/python -m pytest -q -ra

bench-quant: model
	$(BIN)/python benchmarks/quantization.py

bench-quality: model
	$(BIN)/python benchmarks/quality_vs_peers.py

bench-prune: model
	$(BIN)/python benchmarks/pruning.py

bench-structured: model
	$(BIN)/python benchmarks/structured.py

bench-serve: model
	$(BIN)/python benchmarks/serving.py

bench-llamacpp: model
	$(BIN)/python benchmarks/vs_llamacpp.py

bench-sizes: model
	$(BIN)/python benchmarks/model_sizes.py

bench-kv: model
	$(BIN)/python benchmarks/kv_cache.py

bench-dist: model
	$(BIN)/python benchmarks/distributed.py

bench: model
	$(BIN)/python benchmarks/core_vs_transformers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
