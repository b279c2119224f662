#!/usr/bin/env bash
# Wheels for running benchmarks/gpu.py on a GPU machine WITHOUT network access whose python3 already holds a CUDA torch,
# accelerate, transformers, pyarrow and pytest (a typical CUDA image): what flowtrain needs beyond that, at the versions
# installed in this checkout's .venv, downloaded here into .whl/ (git-ignored) for that machine's Python.
#
#   bash benchmarks/gpu_wheels.sh            # PYVER=3.12 by default: the target machine's `python3 --version`
#
# Then, in the repository root on the GPU machine (also in benchmarks/README.md, "GPU readiness"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out runs/bench/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
PIP=".venv/bin/python -m pip"
# diffusers, peft: the model code; pydantic (+ its own needs): the config; bitsandbytes: adamw8bit.
PACKAGES=(diffusers peft pydantic pydantic_core annotated-types typing-inspection typing_extensions importlib_metadata
          zipp bitsandbytes)
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
  version=$($PIP show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  if [ -z "$version" ]; then echo "$name is not installed in .venv: run 'make install' first" >&2; exit 1; fi
  $PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
ls -l .whl
du -ch .whl/*.whl | tail -1
