#!/usr/bin/env bash
# Every GPU check of the LM-head kernels in ONE device call, within 550 s of step limits (≈ 9 minutes) on an H100 / H200.
#
#   here, first (PyPI reachable):  bench/gpu_wheels.sh            # liger-kernel + cut-cross-entropy into .whl/
#   then one device call:          run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   dry run on a CPU machine:      GPU_CHECK_DRY=1 bash bench/gpu_check.sh
#
# Steps (each under its own time limit, so one hang cannot eat the call; a failing step does not stop the others):
#   1. the machine: nvidia-smi, torch / triton versions, what is importable;
#   2. compiled-Triton tests (bf16 included): pytest -m "triton or gpu";
#   3. the cost model's PREDICTIONS for the benchmark shapes (traced; no GPU work): the trainer's call with both dW
#      accumulation modes, the forward as the library routes it and through each strategy;
#   4. linear_ce benchmark, one run: t3s (w1 = the trainer's call, all, w50), both dW accumulation modes
#      (t3s_dw_fp32 / t3s_dw_wdtype) and the HF Trainer's loss call (t3s_hf) vs materialised logits,
#      F.linear_cross_entropy, Liger, CCE and the bare cuBLAS GEMMs, N = 16384 and 32768, D = 4096, V = 151936;
#   5. token_logprobs benchmark (forward log-prob + entropy vs one GEMM), N = 4096 and 32768: both forward
#      strategies (t3s_fused: the fused Triton forward, t3s_sweep: the cuBLAS statistics sweep) and the default;
#   6. predicted beside measured (bench/compare.py);
#   7. plots of the results ($OUT/plots), where this checkout has `python -m bench plot`.
# Rows are appended to bench/results/*.csv of the copy on the device and copied to $OUT (they come back): put them
# into the checkout's bench/results/ (cp from files_at) and commit them. The full log is $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
DRY="${GPU_CHECK_DRY:-0}"
PY="${PYTHON:-python3}"
exec > >(tee -a "$LOG") 2>&1
t0=$(date +%s)
COST_PATHS=(trainer trainer_fp32acc forward forward_fused forward_sweep)
step() {  # step NAME SECONDS CMD...: run with a limit, report rc and time, never abort the script
  local name=$1 limit=$2; shift 2
  local s
  s=$(date +%s)
  echo; echo "=== [$name] (limit ${limit}s, at +$(( s - t0 ))s): $*"
  timeout --kill-after=10 "$limit" "$@"; local rc=$?
  echo "=== [$name] rc=$rc in $(( $(date +%s) - s ))s"
}

plots() {  # plots SECONDS: `python -m bench plot` where this checkout has it (branch i23-plots adds it), packed
  # into one archive ($OUT brings back 8 files at most)
  if "$PY" -m bench plot --help >/dev/null 2>&1; then
    step plot "$1" "$PY" -m bench plot --out "$OUT_DIR/plots"
    [ -d "$OUT_DIR/plots" ] && tar -czf "$OUT_DIR/plots.tgz" -C "$OUT_DIR" plots && rm -r "$OUT_DIR/plots"
  else
    echo "=== [plot] skipped: this checkout has no 'python -m bench plot'"
  fi
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE_DIR=$(mktemp -d)  # the carried wheels, beside the image's packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE_DIR" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$SITE_DIR"
fi

step env 45 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true;
  $PY - <<'PY'
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
for m in ('triton', 'liger_kernel', 'cut_cross_entropy', 't3s_kernels'):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, '__version__', 'ok'))
    except Exception as e:
        print(m, 'NOT importable:', type(e).__name__, e)
print('F.linear_cross_entropy:', hasattr(torch.nn.functional, 'linear_cross_entropy'))
PY"

if [ "$DRY" = 1 ]; then  # CPU dry run: the same commands at toy sizes, results to a scratch folder
  RES="$OUT_DIR/results"; mkdir -p "$RES"
  step tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cost_model.py -k "matmul or roofline"
  step cost_model 300 "$PY" -m bench cost_model --n 512 --shapes 256x4096 --paths "${COST_PATHS[@]}" --results-dir "$RES"
  step linear_ce 300 "$PY" -m bench linear_ce --device cpu --dtype fp32 --n 16 --shapes 8x100 --budget-ms 1 \
    --providers t3s t3s_dw_fp32 t3s_dw_wdtype t3s_hf torch --variants w1 w50 --results-dir "$RES"
  step token_logprobs 300 "$PY" -m bench token_logprobs --device cpu --dtype fp32 --n 16 --shapes 8x100 \
    --budget-ms 1 --providers t3s t3s_fused t3s_sweep torch --results-dir "$RES"
  step compare 60 "$PY" -m bench compare --results-dir "$RES"
  plots 60
  cp "$RES"/*.csv "$OUT_DIR"/ 2>/dev/null
  echo "dry run done in $(( $(date +%s) - t0 ))s"
  exit 0
fi

RES=bench/results
step tests 140 "$PY" -m pytest -q -p no:cacheprovider -m "triton or gpu" --continue-on-collection-errors \
  -o addopts="-ra" --junitxml="$OUT_DIR/gpu_tests.xml" tests/
step cost_model 70 "$PY" -m bench cost_model --n 16384 32768 --shapes 4096x151936 --paths "${COST_PATHS[@]}" \
  --results-dir "$RES"
step linear_ce_16k 130 "$PY" -m bench linear_ce --n 16384 --shapes 4096x151936 --budget-ms 200 \
  --variants w1 all w50 --providers t3s t3s_dw_fp32 t3s_dw_wdtype t3s_hf torch torch_lce liger cce \
  --results-dir "$RES"
step linear_ce_32k 70 "$PY" -m bench linear_ce --n 32768 --shapes 4096x151936 --budget-ms 200 \
  --variants w1 w50 --providers t3s t3s_dw_wdtype torch_lce liger --results-dir "$RES"
step token_logprobs 60 "$PY" -m bench token_logprobs --n 4096 32768 --shapes 4096x151936 --budget-ms 200 \
  --providers t3s t3s_fused t3s_sweep t3s_logp torch_chunked --results-dir "$RES"
step compare 20 "$PY" -m bench compare --results-dir "$RES"
plots 15
for f in linear_ce token_logprobs cost_model compare; do
  [ -f "$RES/$f.csv" ] && cp "$RES/$f.csv" "$OUT_DIR/"
done
echo "gpu_check done in $(( $(date +%s) - t0 ))s; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
