# Fresh-machine entry points: `make demo` and `make test` bootstrap everything they need.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
CORE_STAMP := $(VENV)/.installed-core
STAMP      := $(VENV)/.installed-dev

.PHONY: install test lint demo clean

# The demo: ~5 minutes of training on 2 CPU cores, then the test-time curve and a sample.
DEMO_MINUTES ?= 5
ifndef DEMO_DIR
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif

# The demo needs only the package; the tests also need the dev extras (pytest, hypothesis, datasets, lm-eval, …).
$(CORE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pin torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e . "$(TORCH_SPEC)"
	touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP)
	$(BIN)/pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# AdamW 3e-3 and 128-token rows, as the reference test-time measurement (docs/LOG.md: at this budget the paper's
# Muon recipe reaches a slightly lower loss but a flat test-time curve).
demo: $(CORE_STAMP)
	$(BIN)/parcae train --preset parcae-tiny --data stdlib --minutes $(DEMO_MINUTES) --out $(DEMO_DIR) \
		--seq-len 128 --set optimizer=adamw --lr 3e-3
	$(BIN)/parcae eval $(DEMO_DIR) --depths 1,2,4,8,16 --batches 8 --seeds 1
	@echo "--- sample at T = 8 (prompt: 'def ') ---"
	$(BIN)/parcae generate $(DEMO_DIR) --prompt "def " --steps 8 --max-new-tokens 200

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
