# make demo   set up .venv if needed, then run the offline main job end to end
# make test   set up .venv if needed, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: env demo test lint bench-demo bench-quality bench-ingest bench-oracle-batch bench-glue bench-expansion bench-round bench-scale bench-gpu bench-cache clean-demo

env:
	@bash scripts/setup_env.sh $(VENV)

demo: env
	@bash scripts/demo.sh $(VENV)

# Two pytest workers, each with its own local Ray cluster, one test file at a time, the slowest
# files first (the end-to-end runs, then every file over ~20 s) and the quick ones last, so that
# neither worker is left with a long tail while the other has nothing to do.
TEST_WORKERS ?= 2
FIRST := tests/test_tapir.py tests/test_citing.py tests/test_oracle.py tests/test_student.py \
	tests/test_oracle_batch.py tests/test_embed.py tests/test_oracle_replies.py tests/test_ingest.py \
	tests/test_train.py tests/test_submit.py tests/test_expansion.py tests/test_assets.py \
	tests/test_cluster.py
test: env
	$(VENV)/bin/ruff check tapir_ray tests benchmarks
	$(PY) -m pytest -q --durations=12 -n $(TEST_WORKERS) --dist loadfile $(FIRST) tests

lint: env
	$(VENV)/bin/ruff check tapir_ray tests benchmarks
	$(VENV)/bin/ruff format --check tapir_ray tests benchmarks

# a fresh clone's `make env` and `make demo`, timed, with the model cache emptied first
bench-demo: env
	$(PY) benchmarks/demo_wall.py --fresh-models

# TAPIR against random selection on tasks a program checks (3 seeds; hours on 2 CPU cores)
bench-quality: env
	$(PY) benchmarks/quality_verifiable.py --seeds 3

bench-ingest: env
	$(PY) benchmarks/ingest_throughput.py --rows 100000 1000000

bench-glue: env
	$(PY) benchmarks/round_glue.py --rows 100000 1000000

# Expansion acceptance at the sizes a large pool asks for (100,000-row pool).
bench-expansion: env
	$(PY) benchmarks/expansion_scale.py --expansions 20000 100000 500000 --pool 100000

# one whole TAPIR round at 100,000 and 1,000,000 rows, and the scoring phase's halves alone at
# 100,000 (tiny models, scripted oracle; about 2 hours on 2 cores)
bench-round: env
	$(PY) benchmarks/round_scale.py --rows 100000 1000000 --alone 100000

bench-scale: bench-round

# on a machine with a GPU (no Ray or vLLM needed there): generation, LoRA steps, embeddings
bench-gpu: env
	$(PY) benchmarks/gpu_paths.py --pack .gpu_assets
	$(PY) benchmarks/gpu_paths.py --assets .gpu_assets

bench-oracle-batch: env
	$(PY) benchmarks/oracle_batch.py --requests 100000

# the response cache at a 1M-row round's scale: the driver's memory compacting its 2 million
# replies, and an oracle actor's while it stores its share of them
bench-cache: env
	$(PY) benchmarks/cache_compaction.py --replies 2000000

clean-demo:
	rm -rf runs/demo
