# witscale — set-up, demo and tests. Every target creates the virtualenv first if it is missing.
# Order matters: torch (local CPU build) first, then deepspeed without build isolation (otherwise pip
# resolves a multi-GB CUDA torch for the build), then everything else, all pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch lies on local disk here; without it pip would fetch a multi-GB CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PIP_INSTALL := $(PY) -m pip --disable-pip-version-check install -q $(FIND_LINKS) -c constraints.txt
STAMP  := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore::FutureWarning
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench clean gpu-wheels gpu-check-dry bench-dpo-env

setup: $(STAMP)

$(STAMP): constraints.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) --no-build-isolation deepspeed
	$(PIP_INSTALL) transformers datasets tensorboard mpi4py sentencepiece safetensors protobuf psutil \
	    pyarrow pytest pytest-xdist hypothesis matplotlib pyyaml
	$(PIP_INSTALL) --no-build-isolation --no-deps -e .
# the evaluation extra (witscale[eval]): lm-eval for tools/evaluate.py --tasks, accelerate for its HF backend
	$(PIP_INSTALL) lm-eval accelerate
# the W&B extra (witscale[wandb]): train.py --report-to wandb, tested offline
	$(PIP_INSTALL) wandb
	touch $@

## The README's main command: the end-to-end CPU demo on its embedded default.
demo: $(STAMP)
	$(PY) tools/demo.py

## The README's test command (also what .ci/run calls): every test, both tiers, in TEST_WORKERS parallel pytest
## processes (pytest-xdist). More workers than cores on purpose: most of a multi-process test's wall time is waiting
## (process start-up, timeouts the tests provoke), not CPU. --dist loadgroup: tests/conftest.py puts what one
## machine has one of (the local Slurm, mpirun's port) into one group, run by one worker in order. DeepSpeed's JIT
## extensions are built first, once (tests/build_extensions.py), not by a rank of whichever worker gets there first.
# 3 workers: ~20 minutes on a fresh clone (19 min 16 s of tests), 30 under heavy load; ~33 one test at a time. Issue 26: the Slurm tests had not been serialized at
# all (xdist's group marker does nothing under pytest 9; tests/conftest.py now groups them in xdist's scheduler);
# their waits are hang bounds that allow for the load, and each starts on idle nodes and cancels its jobs when it
# ends (tests/slurm_helpers.py, README's Tests). TEST_WORKERS=1 runs one test at a time.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) tests/build_extensions.py
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

## The fast tier, before a commit: every test not marked `slow` (no ranks, Slurm, demo or benchmark; README, Tests).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) tools/bench/bench_pack.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache

## Wheels for an offline CUDA machine (Python 3.12, manylinux x86_64) that has torch, transformers, triton,
## ninja, sentencepiece, pytest … but not DeepSpeed: DeepSpeed as a pure-Python wheel built here (its CUDA
## ops JIT-compile there) and those of its dependencies that machine lacks, one pinned version each from
## constraints.txt. Nothing is installed into $(VENV) and no CUDA wheel is fetched. On the GPU machine:
##   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
##       .whl/*.whl && export PYTHONPATH=/tmp/site
GPU_WHEEL_DIR  := .whl
GPU_WHEEL_DEPS := hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
GPU_PLATFORMS  := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
                  manylinux1_x86_64
pin = $(or $(shell grep -i -m1 '^$(1)==' constraints.txt),$(error $(1) is not pinned in constraints.txt))

gpu-wheels: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m pip --disable-pip-version-check wheel -q --no-deps --no-build-isolation -w "$$tmp" \
	    $(call pin,deepspeed) && \
	$(PY) -m pip --disable-pip-version-check download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp $(foreach p,$(GPU_PLATFORMS),--platform $(p)) -d "$$tmp" \
	    $(foreach p,$(GPU_WHEEL_DEPS),$(call pin,$(p))) && \
	rm -rf $(GPU_WHEEL_DIR) && mkdir -p $(GPU_WHEEL_DIR) && cp "$$tmp"/*.whl $(GPU_WHEEL_DIR)/
	@ls -1s --block-size=K $(GPU_WHEEL_DIR) && du -sh $(GPU_WHEEL_DIR)

## The GPU check's CPU part (what tests/test_gpu_check.py runs): no CUDA needed.
gpu-check-dry: $(STAMP)
	$(PY) tools/gpu_check.py --dry-run --output gpu_check_dry.json

## TRL for tools/bench/bench_dpo.py only, in a directory of its own that the benchmark puts on PYTHONPATH of its
## TRL subprocess: TRL is not a witscale dependency and never enters $(VENV). --no-deps: its dependencies
## (accelerate, datasets, transformers, pandas, pyarrow …) are $(VENV)'s pinned ones, so pip cannot swap torch
## for a CUDA build; the import check below fails if one is missing.
TRL_VERSION   ?= 1.16.0
BENCH_DPO_TRL := build/bench-dpo-trl

bench-dpo-env: $(STAMP)
	$(PY) -m pip --disable-pip-version-check install -q --no-deps --upgrade --target $(BENCH_DPO_TRL) trl==$(TRL_VERSION)
	PYTHONPATH=$(BENCH_DPO_TRL) $(PY) -c "import trl; from trl import DPOConfig, DPOTrainer; print('TRL', trl.__version__, 'in $(BENCH_DPO_TRL)')"
