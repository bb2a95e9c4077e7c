"""The fast paths are fast by construction: what the real calls issue at full LLM shapes, traced on CPU.

Each test runs the public call (``impl="auto"`` with tensors that report device ``cuda``, so the GPU dispatch is
taken; or ``cpu`` for the CPU path) under :class:`bench._trace.CostTracer` and checks the structure the design asks
for (``shared/DESIGN.md`` "Strategy and speed", issues 8 and 10):

* the trainer's weighted-mean call issues 6·N·D·V GEMM FLOPs (not 8 or 10), and with 50 % zero weight half that;
* ``reduction="none"`` + backward recomputes at most once: ≤ 8·N·D·V;
* the forward log-prob pass issues 2·N·D·V;
* the largest live temporaries beyond inputs and gradient outputs stay ≤ 1 GiB at N = 32768, D = 4096,
  V = 151936 (bf16) on every training path;
* the cost model predicts ≤ 1.2× the three-GEMM floor for the trainer's call and ≤ 1.2× one GEMM for the forward on
  H100 and H200 (a PREDICTION from traced counts, see ``bench/cost_model.py``);
* the CPU path forms gradients without recomputing the forward (6·N·D·V) within a bounded workspace, and scoring a
  32K-token trace holds a bounded block.

These are structural checks, not timings: they run in CI in well under a minute.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import cost_model  # noqa: E402

GiB = 2**30
D, V = 4096, 151936
BIG_N = 32768


@functools.cache
def traced(path: str, N: int, D: int = D, V: int = V, device: str = "cuda", dtype: str = "bfloat16"):
    return cost_model.trace_path(path, N, D, V, dtype=getattr(torch, dtype), device=device)


def _ndv(s, N, D=D, V=V) -> float:
    return s.gemm_flops / (float(N) * D * V)


@pytest.mark.parametrize("N", [16384, BIG_N])
def test_trainer_weighted_mean_issues_six_ndv(N):
    s = traced("trainer", N)
    assert 5.95 <= _ndv(s, N) <= 6.15, f"trainer call issues {_ndv(s, N):.2f}·N·D·V GEMM FLOPs, expected ≈ 6"


def test_unweighted_mean_issues_six_ndv():
    s = traced("mean", BIG_N)
    assert 5.95 <= _ndv(s, BIG_N) <= 6.15, f"{_ndv(s, BIG_N):.2f}·N·D·V"


def test_half_zero_weight_halves_the_gemm_flops():
    dense, half = traced("trainer", BIG_N), traced("w50", BIG_N)
    ratio = half.gemm_flops / dense.gemm_flops
    assert 0.45 <= ratio <= 0.56, f"50 % zero weight issues {ratio:.2f}× the dense GEMM FLOPs, expected ≈ 0.5"
    assert _ndv(half, BIG_N) <= 3.2, f"{_ndv(half, BIG_N):.2f}·N·D·V at 50 % zero weight, expected ≈ 3"


def test_reduction_none_backward_recomputes_at_most_once():
    s = traced("none", BIG_N)
    assert _ndv(s, BIG_N) <= 8.15, f"reduction='none' + backward issues {_ndv(s, BIG_N):.2f}·N·D·V, expected ≤ 8"


def test_forward_logprobs_issues_two_ndv():
    s = traced("forward", BIG_N)
    assert 1.95 <= _ndv(s, BIG_N) <= 2.05, f"{_ndv(s, BIG_N):.2f}·N·D·V"


@pytest.mark.xfail(strict=True, reason=(
    "issue 8, open: with half-precision weights the exact fp32 dW accumulator is V*D*4 bytes (2.4 GiB at "
    "V=151936, D=4096) of workspace; weight_grad_accumulation='weight_dtype' avoids it but is approximate"))
@pytest.mark.parametrize("path", ["trainer", "mean", "none", "w50"])
def test_training_workspace_is_at_most_1_gib(path):
    s = traced(path, BIG_N)
    assert s.workspace_bytes <= 1 * GiB, (
        f"{path}: {s.workspace_bytes / 2**20:.0f} MiB of temporaries at N={BIG_N}, D={D}, V={V}; largest at the "
        f"peak: {s.workspace_at_peak}"
    )


def _assert_predicted_within(path: str, N: int, limit: float, floor: str) -> None:
    row = cost_model.predict(path, N, D, V, cost_model.GPUS, traced(path, N))
    for gpu in ("h100", "h200"):
        assert row[f"{gpu}_x"] <= limit, f"PREDICTED {gpu}: {path} {row[f'{gpu}_x']:.2f}× {floor} at N={N}"


@pytest.mark.parametrize("N", [16384, BIG_N])
def test_predicted_trainer_ratio_within_1_2_of_the_floor(N):
    _assert_predicted_within("trainer", N, 1.2, "the three-GEMM floor")


def test_predicted_half_zero_weight_time_at_most_0_6_of_unmasked():
    dense = cost_model.predict("trainer", BIG_N, D, V, cost_model.GPUS, traced("trainer", BIG_N))
    half = cost_model.predict("w50", BIG_N, D, V, cost_model.GPUS, traced("w50", BIG_N))
    for gpu in ("h100", "h200"):
        assert half[f"{gpu}_ms"] <= 0.6 * dense[f"{gpu}_ms"], (
            f"PREDICTED {gpu}: 50 % zero weight takes {half[f'{gpu}_ms'] / dense[f'{gpu}_ms']:.2f}× the unmasked time"
        )


@pytest.mark.xfail(strict=True, reason=(
    "issue 8, open: the fused forward is one GEMM of FLOPs, but the model's assumed Triton tl.dot efficiency "
    "(0.60 of peak, vs 0.80 for cuBLAS) predicts 1.38-1.40x; only a GPU run can settle the efficiency"))
@pytest.mark.parametrize("N", [4096, BIG_N])
def test_predicted_forward_within_1_2_of_one_gemm(N):
    _assert_predicted_within("forward", N, 1.2, "one GEMM")


def test_trainer_call_reads_the_host_at_most_once():
    s = traced("trainer", BIG_N)
    assert s.host_syncs <= 1, f"{s.host_syncs} host reads on the trainer's call"


# ---------------------------------------------------------------------------------------------------- CPU path


def test_cpu_path_forms_gradients_without_recomputing_the_forward():
    N, d = 4096, 128
    s = traced("mean", N, d, V, device="cpu", dtype="float32")
    assert 5.95 <= _ndv(s, N, d) <= 6.15, f"CPU fwd+bwd issues {_ndv(s, N, d):.2f}·N·D·V, expected ≈ 6 (no recompute)"


def test_cpu_path_workspace_is_bounded():
    N, d = 4096, 128
    s = traced("mean", N, d, V, device="cpu", dtype="float32")
    assert s.workspace_bytes <= 1 * GiB, f"{s.workspace_bytes / 2**20:.0f} MiB; at the peak: {s.workspace_at_peak}"


def test_cpu_scoring_a_long_trace_holds_a_bounded_block():
    """Issue 10's target is ≤ 1.5 GB scoring 32,768 tokens. A chunked scorer holds one block plus O(N) outputs
    (a few N-sized vectors: at most 64 bytes a token, 2 MiB at 32K), so 8192 tokens are traced (four times fewer
    ops for CI) and the O(N) part of 32K is added."""
    n = 8192
    s = traced("forward", n, 128, V, device="cpu", dtype="float32")
    at_32k = s.workspace_bytes + (BIG_N - n) * 64
    assert at_32k <= 1.5 * GiB, f"{at_32k / 2**20:.0f} MiB; at the peak: {s.workspace_at_peak}"
