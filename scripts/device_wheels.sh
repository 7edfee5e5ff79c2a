#!/usr/bin/env bash
# Wheels of what scripts/gpu_check.py imports beyond a stock PyTorch GPU image, for a GPU machine
# that cannot reach a package index. Such images hold torch, transformers, triton, pandas, tqdm,
# filelock and PyYAML, but seldom hydra-core and omegaconf (capkv's config layer), which the
# script imports through capkv. All three wheels are pure Python (about 0.4 MB together).
#
#   bash scripts/device_wheels.sh                      # here, where pip reaches an index: writes .whl/
#   # there, in the repository root, with .whl/ copied along:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out results/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
# antlr4-python3-runtime 4.9.3 (omegaconf 2.3's pin) is published as a source archive only.
python3 -m pip wheel -q --no-deps -w .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
ls -1 .whl
