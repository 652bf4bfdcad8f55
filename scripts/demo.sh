#!/usr/bin/env bash
# The main job on built-in defaults: set up, then train the tiny UniF2ace model on the built-in
# synthetic face set with the fused ops (CPU, or CUDA when a GPU is present), generate faces for
# held-out captions, answer held-out questions and write results/demo/report.md (+ report.json,
# samples.png, loss_curve.png). About 5 minutes on 2 CPU cores. Extra arguments go to the demo
# (e.g. --steps 300, --max-minutes 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m unif2ace demo --out results/demo "$@"
