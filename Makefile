# Set-up and the two front-door jobs. Everything installs into .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/arr-coc: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 (CPU) from the local wheel; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/arr-coc

.PHONY: demo test lint
demo: $(BIN)/arr-coc  ## the main job: arr-coc-tiny answers a held-out sample and shows where its tokens went
	$(BIN)/arr-coc demo

test: $(BIN)/arr-coc  ## the test suite (not the `slow` marker)
	$(BIN)/python -m pytest -q

lint: $(BIN)/arr-coc
	$(BIN)/ruff check src tests benchmarks
