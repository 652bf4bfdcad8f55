#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) and build the extensions.
# Idempotent: a second run only rebuilds what changed. Python >= 3.10 needed (python3 on PATH,
# or set PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing pinned dev requirements"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
echo "== building unif2ace (C++ extension; CUDA extension only with a CUDA torch)"
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
  | grep -v "^\s*$" || true
.venv/bin/python -c "import unif2ace.kernels._ext as e; ok, err = e.cpu_status(); assert ok, err" \
  || { echo "the C++ extension failed to build/load"; exit 1; }
