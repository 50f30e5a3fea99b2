# Set-up and the two front-door jobs. Each installs what it needs on first use, apart: the demo into .venv
# (arr-coc alone), the tests into .venv-test (arr-coc with the test extras: bitsandbytes, torchao, onnx...,
# pytest, playwright; and chromium for the browser test where we are root and apt exists). transformers imports
# torchao whenever it is installed, so the demo's environment carries none of the extras.
PY ?= python3

# $(1): the virtual environment's folder, $(2): what to install from this checkout
define install
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	# torch 2.13.0 (CPU) from the local wheel; an unpinned torch would pull a multi-GB CUDA build
	$(1)/bin/pip install -q "torch==2.13.0"
	$(1)/bin/pip install -q -e "$(2)"
	touch $(1)/bin/arr-coc
endef

.venv/bin/arr-coc: pyproject.toml
	$(call install,.venv,.)

.venv-test/bin/arr-coc: pyproject.toml
	$(call install,.venv-test,.[test])

.PHONY: demo test lint chromium
demo: .venv/bin/arr-coc  ## the main job: arr-coc-tiny answers a held-out sample and shows where its tokens went
	.venv/bin/arr-coc demo

test: .venv-test/bin/arr-coc chromium  ## the test suite (not the `slow` marker); CI runs exactly this
	.venv-test/bin/python -m pytest -q

chromium:  ## Debian's chromium drives the app in the browser test; without it that test is skipped, saying how to install it
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
		echo "chromium is not installed (needs root and apt): the browser test will be skipped"

lint: .venv-test/bin/arr-coc
	.venv-test/bin/ruff check src tests benchmarks
