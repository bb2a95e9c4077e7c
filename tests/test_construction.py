"""The fast paths are fast by construction: what the real calls issue at full LLM shapes, traced on CPU.

Each test runs the public call (``impl="auto"`` with tensors that report device ``cuda``, so the GPU dispatch is
taken; or ``cpu`` for the CPU path) under :class:`bench._trace.CostTracer` and checks the structure the design asks
for (``shared/DESIGN.md`` "Strategy and speed", issues 8 and 10):

* the trainer's weighted-mean call issues 6·N·D·V GEMM FLOPs (not 8 or 10), and with 50 % zero weight half that;
* ``reduction="none"`` + backward recomputes at most once: ≤ 8·N·D·V;
* the forward log-prob pass issues 2·N·D·V;
* the largest live temporaries beyond inputs and gradient outputs stay ≤ 1 GiB at N = 32768, D = 4096,
  V = 151936 (bf16) on every training path in default settings (issue 25's dW contract: bf16 weights accumulate
  in bf16 per super-chunk);
* the cost model predicts ≤ 1.2× the three-GEMM floor for the trainer's call on H200 and ≤ 1.15× on H100 (issue
  25's goal), and (a strict xfail while open) ≤ 1.15× one GEMM for the forward (PREDICTIONS from traced counts, see
  ``bench/cost_model.py``);
* a strided hidden-state view reaches the kernels without a copy;
* every shipped caller (HF Trainer, dLLM step, profiler, the trainer's call) issues zero host syncs, counted by the
  strict tracer (nonzero, masked_select, boolean indexing, ``.item()``, ``.tolist()``, device-to-host copies);
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


@pytest.mark.parametrize("path", ["trainer", "mean", "none", "w50"])
def test_training_workspace_is_at_most_1_gib(path):
    s = traced(path, BIG_N)
    assert s.workspace_bytes <= 1 * GiB, (
        f"{path}: {s.workspace_bytes / 2**20:.0f} MiB of temporaries at N={BIG_N}, D={D}, V={V}; largest at the "
        f"peak: {s.workspace_at_peak}"
    )


def _assert_predicted_within(path: str, N: int, limit: float, floor: str, gpus=("h100", "h200")) -> None:
    row = cost_model.predict(path, N, D, V, cost_model.GPUS, traced(path, N))
    for gpu in gpus:
        assert row[f"{gpu}_x"] <= limit, f"PREDICTED {gpu}: {path} {row[f'{gpu}_x']:.3f}× {floor} at N={N}"


@pytest.mark.parametrize("N", [16384, BIG_N])
def test_predicted_trainer_ratio_within_1_2_of_the_floor_on_h200(N):
    """On the H200's wider HBM the call is within 1.2× (the H100 goal, ≤ 1.15×, is pinned below)."""
    _assert_predicted_within("trainer", N, 1.2, "the three-GEMM floor", gpus=("h200",))


def test_predicted_half_zero_weight_time_at_most_0_6_of_unmasked():
    dense = cost_model.predict("trainer", BIG_N, D, V, cost_model.GPUS, traced("trainer", BIG_N))
    half = cost_model.predict("w50", BIG_N, D, V, cost_model.GPUS, traced("w50", BIG_N))
    for gpu in ("h100", "h200"):
        assert half[f"{gpu}_ms"] <= 0.6 * dense[f"{gpu}_ms"], (
            f"PREDICTED {gpu}: 50 % zero weight takes {half[f'{gpu}_ms'] / dense[f'{gpu}_ms']:.2f}× the unmasked time"
        )


@pytest.mark.parametrize("N", [16384, BIG_N])
def test_predicted_trainer_within_1_15_of_the_floor_on_h100(N):
    row = cost_model.predict("trainer", N, D, V, {"h100": cost_model.GPUS["h100"]}, traced("trainer", N))
    assert row["h100_x"] <= 1.15, f"PREDICTED h100: trainer {row['h100_x']:.3f}x the three-GEMM floor at N={N}"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "issue 25, open: LLM-sized no_grad calls take the cuBLAS statistics sweep (the fused Triton forward is L2-bound, "
    "~1.77x); after each logits GEMM, on one stream, its row kernel reads the fp32 chunk once (4 bytes per logit at "
    "0.75 x 3.35 TB/s against 2·D FLOPs per logit at 0.80 x 989 TFLOP/s: +15 % at D=4096 whatever the chunking): "
    "1.16x one GEMM at N=32768, 1.17x at N=4096 on an H100 predicted; closing it needs the row pass overlapped "
    "with the next GEMM or fused into its epilogue"))
@pytest.mark.parametrize("N", [4096, BIG_N])
def test_predicted_forward_within_1_15_of_one_gemm(N):
    _assert_predicted_within("forward", N, 1.15, "one GEMM")


def test_strided_hidden_states_are_not_copied():
    """``hidden[:, :-1]`` (the profiler's view) reaches the statistics sweep as it is: its rows are gathered per
    chunk (no op writes the view's bytes again), and the sweep really runs on them (one logits GEMM pass of
    2·N·D·V FLOPs, the row kernel over every row)."""
    from bench._trace import CostTracer
    from t3s_kernels import token_logprobs

    B, T = 4, 4097
    N = B * (T - 1)
    tr = CostTracer("cuda")
    hidden = tr.tensor((B, T, D), torch.bfloat16)
    w = tr.tensor((V, D), torch.bfloat16)
    y = tr.real(torch.randint(0, V, (B, T - 1), generator=torch.Generator().manual_seed(0)))
    with tr, tr.triton_launches(), torch.no_grad():
        token_logprobs(hidden[:, :-1], w, y, return_entropy=True)
    view_bytes = N * D * 2
    copies = [r for r in tr.records if r.kind == "aten" and not r.gemm_flops and r.bytes_written >= view_bytes]
    assert not copies, f"{[(r.name, r.shapes) for r in copies]} write the {view_bytes / 2**20:.0f} MiB view again"
    gemm = sum(r.gemm_flops for r in tr.records if r.kind == "aten")
    assert gemm == pytest.approx(2.0 * N * D * V, rel=1e-6), f"{gemm / (N * D * V):.3f}·N·D·V, expected 2"
    rows = sum(r.ctas for r in tr.records if r.kind == "triton" and r.name == "_lce_chunk_row_kernel")
    assert rows == N, f"the row kernel ran over {rows} rows, expected {N}"


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


# ------------------------------------------------------------------------------------------- shipped callers
# Each shipped caller of the loss, traced at an LLM shape with the GPU dispatch by the strict tracer (which counts
# nonzero, masked_select, boolean indexing, .item(), .tolist() and device-to-host copies): zero host syncs.

CALLER_B, CALLER_T = 2, 2048  # N = 4096 tokens


def _caller_batch(seed: int = 0):
    """A collated host batch: prompt of 256 tokens (-100), response after it, the second row padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (CALLER_B, CALLER_T), generator=g)
    labels = ids.clone()
    labels[:, :256] = -100
    labels[1, CALLER_T - 300:] = -100
    mask = torch.ones_like(ids)
    mask[1, CALLER_T - 300:] = 0
    return ids, labels, mask


def _assert_no_sync(tr, who: str) -> None:
    assert tr.syncs == [], f"{who}: {tr.host_syncs} host syncs on the GPU path: {tr.syncs}"


def test_hf_trainer_call_has_no_host_sync():
    """SelectionCollator (host) -> the Trainer's upload -> T3SCausalLM.compute_loss (fused loss) -> backward."""
    from types import SimpleNamespace

    from bench._trace import CostTracer
    from t3s.integrations.hf_trainer import SelectionCollator, T3SCausalLM, T3SCausalLMOutput

    ids, labels, _ = _caller_batch()
    feats = [{"id": str(i), "input_ids": ids[i].tolist(), "labels": labels[i].tolist()} for i in range(CALLER_B)]
    batch = SelectionCollator(None, pad_token_id=0)(feats)
    assert batch["active_rows"].device.type == "cpu"
    tr = CostTracer("cuda")
    h = tr.tensor((CALLER_B, CALLER_T, D), torch.bfloat16, requires_grad=True)
    w = tr.tensor((V, D), torch.bfloat16, requires_grad=True)
    model = SimpleNamespace(_head_tensors=lambda hidden: (hidden, w, None), ignore_index=-100, label_smoothing=0.0,
                            z_loss=0.0, softcap=None, temperature=1.0, impl="auto", strategy="auto")
    with tr, tr.triton_launches():
        dev = {k: v.to("cuda") for k, v in batch.items()}  # the Trainer's _prepare_inputs
        n_items = (dev["labels"][:, 1:] != -100).sum()  # the Trainer's num_items_in_batch, a device tensor
        out = T3SCausalLMOutput(hidden_states=h, token_weight=dev["token_weight"], active_rows=dev["active_rows"])
        loss = T3SCausalLM.compute_loss(model, out, dev["labels"], num_items_in_batch=n_items)
        loss.backward()
    _assert_no_sync(tr, "HF Trainer compute_loss")
    assert tr.records, "nothing traced"


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_dllm_step_has_no_host_sync(monkeypatch, normalization):
    """prepare_dllm_batch on a host batch (mask drawn there) -> upload -> dllm_loss (fused loss) -> backward."""
    from types import SimpleNamespace

    import t3s.dllm as dllm
    from bench._trace import CostTracer

    ids, labels, mask = _caller_batch()
    cfg = dllm.DLLMConfig(mask_token_id=999, normalization=normalization)
    tr = CostTracer("cuda")
    h = tr.tensor((CALLER_B, CALLER_T, D), torch.bfloat16, requires_grad=True)
    w = tr.tensor((V, D), torch.bfloat16, requires_grad=True)
    lm = SimpleNamespace(_head_tensors=lambda hidden: (hidden, w, None), softcap=None, temperature=1.0)
    monkeypatch.setattr(dllm, "_adapter", lambda model: lm)
    monkeypatch.setattr(dllm, "x_t_hidden_states", lambda model, prepared: h)
    with tr, tr.triton_launches():
        prepared = dllm.prepare_dllm_batch({"input_ids": ids, "labels": labels, "attention_mask": mask}, cfg,
                                           step=3, device="cuda")
        normalizer = dllm.step_normalizer([prepared], cfg.normalization)
        out = dllm.dllm_loss(None, prepared, cfg, normalizer)
        out.loss.backward()
    _assert_no_sync(tr, f"dLLM step ({normalization})")
    assert prepared.active_rows.device.type == "cuda" and prepared.active_rows.numel() > 0


def test_profiler_scoring_has_no_host_sync(monkeypatch):
    """score_batch (the profiler's forward): hidden[:, :-1] -> token_logprobs + entropy, no_grad."""
    import t3s.profile as profile
    import t3s.scoring as scoring  # where score_batch looks its helpers up
    from bench._trace import CostTracer

    ids, labels, mask = _caller_batch()
    tr = CostTracer("cuda")
    h = tr.tensor((CALLER_B, CALLER_T, D), torch.bfloat16)
    head = scoring.LMHead(tr.tensor((V, D), torch.bfloat16), None, None, 1.0)
    monkeypatch.setattr(scoring, "lm_head", lambda model: head)
    monkeypatch.setattr(scoring, "trunk_hidden_states", lambda *a, **k: h)
    with tr, tr.triton_launches():
        logprob, entropy = profile.score_batch(None, ids.to("cuda"), labels, mask.to("cuda"),  # as profile.py
                                               return_entropy=True)
    _assert_no_sync(tr, "profiler score_batch")
    assert tuple(logprob.shape) == (CALLER_B, CALLER_T) and entropy is not None


def test_cost_model_trainer_call_has_no_host_sync():
    """The cost model's own traced trainer call (active rows handed over, as t3s/train.py does)."""
    s = traced("trainer", BIG_N)
    assert s.host_syncs == 0, f"{s.host_syncs} host syncs on the trainer's call"
