# Two commands work on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
# torch is installed first with an exact pin: any other torch request would pull several GB of CUDA wheels
# on a CPU machine, and on a CUDA machine the same pin gets the CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo demo-video test test-all lint format clean gpu-bench gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

# --overwrite: `make demo` regenerates runs/demo (an earlier demo there is replaced once the new one is complete)
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/flowtrain demo --overwrite

# the text-to-video demo (docs/video.md, "Video demo"): moving digits, a Wan video VAE + transformer, runs/demo-video
demo-video: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/flowtrain demo --video --overwrite

# The suite runs subprocesses side by side, so its OpenMP threads always wait passively: spinning ones would make
# a step 10-50x slower whenever another process wants the cores (`flowtrain` itself decides from the load it sees).
test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m pytest -q -m "slow or not slow"

# GPU readiness (benchmarks/gpu.py): Klein-4B-shaped step time, MFU, memory, compile, the CUDA-only tests. Needs a CUDA
# GPU (on a Linux GPU machine the torch pin above installs the CUDA build; bitsandbytes comes with the dev extra);
# ≤ 8 minutes on one H200. Options: make gpu-bench GPU_BENCH_ARGS="--budget-s 300".
gpu-bench: $(STAMP)
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $(BIN)/python benchmarks/gpu.py --out runs/bench/gpu.json $(GPU_BENCH_ARGS)

# Wheels into .whl/ for a GPU machine without network access whose python3 has a CUDA torch (benchmarks/README.md).
gpu-wheels: $(STAMP)
	bash benchmarks/gpu_wheels.sh

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
