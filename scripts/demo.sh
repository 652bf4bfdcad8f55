#!/usr/bin/env bash
# The main job on built-in defaults: set up, then run the benchmark runner's quick mode on this
# machine (CPU, or CUDA when a GPU is present) and write the JSON records to results/.
# (The training issue replaces this with the end-to-end training demo.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
dev=cpu
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && dev=cuda
mkdir -p results
.venv/bin/python benchmarks/run.py --device "$dev" --quick --json "results/bench_${dev}_quick.json" "$@"
