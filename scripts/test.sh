#!/usr/bin/env bash
# The whole test suite on a fresh machine: environment + build, lint, CUDA compile check, pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k d3diff).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/bootstrap.sh
echo "== lint"
bash scripts/lint.sh
echo "== python -m unif2ace info"
.venv/bin/python -m unif2ace info
echo "== CUDA compile check"
.venv/bin/python scripts/check_cuda_compile.py -j 2
echo "== CUDA emulator build (test-only: csrc/cuda/*.cu as C++ on csrc/cuda/emu)"
.venv/bin/python -m unif2ace.testing.cuda_emu
echo "== pytest"
.venv/bin/python -m pytest -n 2 -q "$@"
echo "== done in $(( $(date +%s) - t0 )) s"
