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

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): constraints.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) --no-build-isolation deepspeed
	$(PIP_INSTALL) transformers datasets tensorboard mpi4py sentencepiece safetensors protobuf psutil \
	    pyarrow pytest hypothesis matplotlib
	$(PIP_INSTALL) --no-build-isolation --no-deps -e .
	touch $@

## The README's main command: the end-to-end CPU demo on its embedded default.
demo: $(STAMP)
	$(PY) tools/demo.py

## The README's test command (also what .ci/run calls).
test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) tools/bench/bench_pack.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
