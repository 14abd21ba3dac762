#!/usr/bin/env bash
# Create .venv and install the workbench with its test tools and the [scale] extra (Ray). Idempotent: a second run
# only checks that everything is installed.
#
# torch: the project asks for a range (torch>=2.2). Where no NVIDIA GPU is visible we
# install torch==2.13.0 first, which these machines serve as a CPU wheel from local disk
# in seconds (an unpinned `torch` would resolve to a multi-GB CUDA build). Set
# WORKBENCH_TORCH to another requirement (e.g. "torch==2.5.1") to override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${WORKBENCH_TORCH:-}" ]; then
    "$VPY" -m pip install -q "$WORKBENCH_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch>=2.2"
  else
    "$VPY" -m pip install -q "torch==2.13.0"
  fi
fi
# dev: the test tools; scale: Ray, so the tests of workers=N (tests/test_scale.py) run too
"$VPY" -m pip install -q -e ".[dev,scale]"
"$VPY" -c "import workbench, torch, transformer_lens; print('workbench', workbench.__version__, '| torch', torch.__version__, '| transformer_lens ok')"
