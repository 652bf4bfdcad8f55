#!/usr/bin/env bash
# Lint step of the test command (and of pre-commit): ruff (lint + format check) over Python,
# clang-format over csrc/. Pass --fix to rewrite files instead of checking them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV_BIN:-.venv/bin}
mapfile -t cxx < <(git ls-files -co --exclude-standard 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')
if [ "${1:-}" = "--fix" ]; then
  "$BIN/ruff" check --fix .
  "$BIN/ruff" format .
  "$BIN/clang-format" -i "${cxx[@]}"
  exit 0
fi
"$BIN/ruff" check .
"$BIN/ruff" format --check .
"$BIN/clang-format" --dry-run --Werror "${cxx[@]}"
echo "lint: ruff and clang-format clean (${#cxx[@]} C++/CUDA files)"
