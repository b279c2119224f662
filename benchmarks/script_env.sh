#!/usr/bin/env bash
# An interpreter in which diffusers' DreamBooth script AND flowtrain both run, for `benchmarks/start.py --script`:
# the script imports torchvision, which flowtrain's own .venv must not get (DESIGN.md §3). Every side of the
# benchmark then runs on this one interpreter, so the comparison shares one torch build.
#
#   bash benchmarks/script_env.sh [VENV]          # default runs/bench/script-venv (git-ignored), ~5.5 GB
#   VENV/bin/python benchmarks/start.py --script DIFFUSERS/examples/dreambooth/train_dreambooth_lora_flux2_klein.py
#
# torch / torchvision: the newest pair whose torchvision imports on a CPU-only machine here (PyPI's torchvision for
# torch 2.13 is a CUDA build that fails beside the CPU torch wheel: "operator torchvision::nms does not exist"):
# 2.14.1 + 0.29.1, CUDA builds that run on the CPU. Override with TORCH=... TORCHVISION=... Everything else is pinned
# to the versions in this checkout's .venv, so only torch differs from the tested set; tensorboard is the script's
# default tracker.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-runs/bench/script-venv}"
TORCH="${TORCH:-2.14.1}"
TORCHVISION="${TORCHVISION:-0.29.1}"
if [ ! -x .venv/bin/python ]; then echo "run 'make install' first (the versions are taken from .venv)" >&2; exit 1; fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$TORCHVISION"
pins="$(mktemp)"
.venv/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|torchvision|triton|nvidia-)' > "$pins"
echo "torch==$TORCH" >> "$pins"
"$VENV/bin/pip" install -q -c "$pins" -e . tensorboard
rm -f "$pins"
"$VENV/bin/python" -c "import torch, torchvision, flowtrain; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
