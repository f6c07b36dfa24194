# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export MUJOCO_GL ?= egl
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv demo test test-fast lint format bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[mujoco,train,tools,dev]"
	touch $(STAMP)

venv: $(STAMP)

# The whole path on a small default (a few minutes on 2 CPUs): log scripted Reacher-v5 episodes
# as RLDS, summarise what tfds reads back, train BC on them, and evaluate the policy on 50 seeded
# episodes next to the scripted expert and random actions on the same episodes.
DEMO_EPISODES ?= 100
demo: venv
	$(BIN)/python run_gym.py --env_name=Reacher-v5 --policy=scripted --num_episodes=$(DEMO_EPISODES) \
		--enable_envlogger --output_dir=demo_out/reacher --overwrite
	$(BIN)/python -m oxe_envlogger.datasets.tfds_summary demo_out/reacher
	rm -rf demo_out/bc
	$(BIN)/python tools/train_bc.py --config=openx_train/configs/bc/reacher_state.py \
		--data=demo_out/reacher --path=demo_out/bc
	$(BIN)/python tools/eval_policy.py --path=demo_out/bc --env_name=Reacher-v5 --num_episodes=50 \
		--baselines=scripted,random --video=demo_out/bc/eval.mp4

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv
	$(BIN)/python bench/bench_logging.py --workloads=w1,w2,codecs,long,long_state
	$(BIN)/python bench/bench_reshard.py
	$(BIN)/python bench/bench_loader.py
	$(BIN)/python bench/bench_stats.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_policy.py
	$(BIN)/python bench/bench_train_loop.py
	$(BIN)/python bench/bench_remix.py

clean:
	rm -rf demo_out bench_out logs .pytest_cache
