#!/usr/bin/env bash
# Creates .venv (Python 3.11 if present) and installs t3s with its test, Hugging Face and cross-check extras.
# torch is installed first as the CPU wheel 2.13.0 so pip never pulls a multi-GB CUDA build; on a GPU machine
# install the torch build you want before running this (an existing torch >= 2.11 is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# The tested versions (scripts/constraints.txt): the demo's numbers reproduce only with the same libraries.
# T3S_UNPINNED=1 lets pip choose within pyproject.toml's bounds instead.
if [ -n "${T3S_UNPINNED:-}" ]; then
  python -m pip install -q -e ".[test,hf,crosscheck]"
else
  python -m pip install -q -e ".[test,hf,crosscheck]" -c scripts/constraints.txt
fi
