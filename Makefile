# One-command set-up: every target below creates .venv from the pinned requirements first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
# pytest-xdist workers for make test (this project's CPU has 2 cores; TEST_JOBS=1: serial)
TEST_JOBS ?= 2

.PHONY: setup train test test-slow test-all gpu-check clean

$(STAMP): requirements.txt requirements-dev.txt requirements-launchers.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)  ## make train ARGS="norm=bcn_ws batch_size_per_device=1"
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)  ## the default suite (real-data tests run when ../shared/data is present)
	$(BIN)/python -m pytest -n $(TEST_JOBS) -m "not slow" --durations=15 $(ARGS)

test-slow: $(STAMP)  ## long tests: real training runs
	$(BIN)/python -m pytest -m slow $(ARGS) || [ $$? -eq 5 ]  # 5: none marked slow

test-all: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

gpu-check: $(STAMP)  ## every CUDA path, one GPU, < 8 min: make gpu-check [OUT=dir] [ARGS=...]
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh $(or $(OUT),results/performance-gpu) $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
