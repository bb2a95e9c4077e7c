#!/usr/bin/env bash
# Checks the kernels against the GPU machine's libraries (Python 3.12, torch 2.11, triton 3.6): not run by CI.
#
# 1. A separate venv (default .venv-triton36, gitignored) with triton 3.6.0 and torch 2.11.0. PyPI offers no CPU
#    build of torch 2.11 (the +cpu wheels live on download.pytorch.org, often unreachable): the plain 2.11.0 wheel
#    (~530 MB, CUDA 13 build) is installed WITHOUT its nvidia / cuda-toolkit dependencies (~3 GB) when torch imports
#    without them; otherwise the dependencies are installed too. No GPU is needed: torch runs on the CPU.
# 2. AOT-compiles every launched kernel configuration for sm_90a (tests/kernels/_aot_compile.py: registers,
#    stack = spills, shared memory, warps, stages, programs per SM) into $REPORT_DIR/aot_<family>.txt, and the
#    profiler's forward at an LLM shape (scripts/aot_llm_shape.py) into $REPORT_DIR/aot_profiler.txt.
# 3. Runs the interpreter kernel tests (TRITON_INTERPRET=1) under triton 3.6.
#
# Usage: scripts/check_triton36.sh [pytest args ...]   (default: the kernel tests listed in TESTS below)
# Env: PYTHON (a Python 3.12 interpreter), VENV, REPORT_DIR (default $VENV/report), TORCH_SPEC, TRITON_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-triton36}
REPORT_DIR=${REPORT_DIR:-$VENV/report}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.6.0}
# triton 3.6's interpreter converts one-element arrays to Python ints, which NumPy >= 2.4 refuses ("only
# 0-dimensional arrays can be converted to Python scalars" in every kernel with a loop bound computed in the kernel;
# triton 3.9 no longer does it): NumPy 2.3 under triton 3.6. Compiled kernels on a GPU do not use NumPy.
NUMPY_SPEC=${NUMPY_SPEC:-numpy<2.4}
TESTS=(tests/kernels/test_linear_cross_entropy.py tests/kernels/test_token_logprobs.py tests/kernels/test_chunked.py
       tests/kernels/test_union_mask.py tests/kernels/test_arguments.py)

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12 python3; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no Python >= 3.10 found: set PYTHON" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  "$(find_python)" -m venv "$VENV"
fi
py="$VENV/bin/python"
"$py" -m pip install -q --upgrade pip
# torch's pure-Python dependencies and the test tools; torch itself without its CUDA libraries first
"$py" -m pip install -q "$TRITON_SPEC" "$NUMPY_SPEC" pyyaml pyarrow tqdm filelock "typing-extensions>=4.10" "sympy>=1.13.3" \
  "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" "setuptools<82" "pytest>=8" "hypothesis>=6.100"
"$py" -m pip install -q --no-deps "$TORCH_SPEC"
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "torch does not import without its CUDA libraries: installing its full dependencies" >&2
  "$py" -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC" "$NUMPY_SPEC"
fi

mkdir -p "$REPORT_DIR"
"$py" - <<'PY' | tee "$REPORT_DIR/versions.txt"
import platform, numpy, torch, triton
print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} numpy {numpy.__version__}")
PY

status=0
for family in lce union_mask; do
  echo "== AOT compile for sm_90a: $family"
  if env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$py" tests/kernels/_aot_compile.py "$family" \
      >"$REPORT_DIR/aot_$family.txt" 2>"$REPORT_DIR/aot_$family.err"; then
    echo "ok"
  else
    echo "FAILED (exit $?): see $REPORT_DIR/aot_$family.err"
    status=1
  fi
  cat "$REPORT_DIR/aot_$family.txt"
done

echo "== AOT compile for sm_90a: the profiler's forward at N = D = 4096, V = 151936 (scripts/aot_llm_shape.py)"
if env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$py" scripts/aot_llm_shape.py >"$REPORT_DIR/aot_profiler.txt" \
    2>"$REPORT_DIR/aot_profiler.err"; then
  echo "ok"
else
  echo "FAILED (exit $?): see $REPORT_DIR/aot_profiler.err"
  status=1
fi
cat "$REPORT_DIR/aot_profiler.txt"

echo "== interpreter kernel tests"
if [ "$#" -eq 0 ]; then
  set -- "${TESTS[@]}"
fi
TRITON_INTERPRET=1 PYTHONPATH="$PWD" "$py" -m pytest -q -p no:cacheprovider "$@" || status=1
exit "$status"
