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

# The main job on a small default: log a MuJoCo task to RLDS, then summarise what tfds reads back.
demo: venv
	$(BIN)/python run_gym.py --env_name=HalfCheetah-v5 --num_episodes=3 --max_episode_steps=200 \
		--enable_envlogger --output_dir=demo_out/half_cheetah --overwrite
	$(BIN)/python -m oxe_envlogger.tfds_summary demo_out/half_cheetah

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
	$(BIN)/python bench/bench_remix.py

clean:
	rm -rf demo_out bench_out logs .pytest_cache
