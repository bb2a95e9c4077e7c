"""Dispatch of the validated public calls: which backend and strategy run, and the reductions in PyTorch.

The path is one way: :mod:`.api` validates and hands a call over here; this module picks the strategy by the cost
rules below and calls the autograd layer (:mod:`.function`), which drives the chunked sweep (:mod:`.chunked`) or
the fused kernels (:mod:`.kernels`). ``torch.compile`` reaches the same eager bodies through the custom ops of
:mod:`.ops`, which import this module (never the reverse).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .._triton import resolve_impl
from . import _checks
from .chunked import ChunkedOptions, active_row_index, row_count, rows_view
from .function import StatsOptions, chunked_cross_entropy, chunked_token_stats, linear_token_stats
from .vocab_parallel import vocab_parallel_token_stats

__all__ = [
    "FORWARD_SWEEP_MIN_FLOPS",
    "FUSED_MAX_FLOPS",
    "LossCall",
    "backend_for",
    "forward_uses_sweep",
    "lce_forward",
    "linear_cross_entropy_eager",
    "master_weight_view",
    "token_logprobs_forward",
    "training_uses_fused",
]

# Cost rule between the two training strategies on the Triton backend (strategy="auto"). With compaction the chunked
# path skips inactive rows as well, and its 6·n·D·V (8·n·D·V for per-token outputs) GEMM FLOPs run at cuBLAS speed,
# against 10·n·D·V for the fused recompute kernels at a fraction of it (their dh / dW kernels read-modify-write fp32
# slabs per tile), so it wins at every LLM shape. The fused kernels win only where the whole call is tiny: no host
# read of the active count, no workspace, three launches instead of ~10 per chunk. Rule: fused when
# 2·n·D·V <= FUSED_MAX_FLOPS, where n = the active row count when the caller hands ``active_rows`` over (very sparse
# masks) and the total row count N otherwise (known without a sync). 2^28 FLOPs ≈ 0.3 ms of one SM, ~1 µs of a
# whole H100 GEMM: below it launch and sync latency dominate (a prediction of the cost model, env override
# T3S_FUSED_MAX_FLOPS).
FUSED_MAX_FLOPS = 2**28

# Rule between the two forward strategies of calls that need no stored state (no_grad scoring, token_logprobs /
# return_lse without gradients): see :func:`forward_uses_sweep`. 2^34 FLOPs ≈ 14 rows at D = 4096, V = 151936.
FORWARD_SWEEP_MIN_FLOPS = 2**34


def _env_int(name: str, default: int) -> int:
    env = os.environ.get(name)
    return int(env) if env else default


def training_uses_fused(strategy: str, n_rows: int, D: int, V: int) -> bool:
    """The training rule (``FUSED_MAX_FLOPS`` above): fused kernels only for tiny calls or when asked for."""
    if strategy != "auto":
        return strategy == "fused"
    return 2 * n_rows * D * V <= _env_int("T3S_FUSED_MAX_FLOPS", FUSED_MAX_FLOPS)


def forward_uses_sweep(strategy: str, n_rows: int, D: int, V: int) -> bool:
    """Whether a forward-only call (no gradient needed) runs the cuBLAS statistics sweep instead of the fused Triton
    forward kernel, on the Triton backend. ``strategy="fused"`` / ``"chunked"`` force one.

    Derivation (predictions, not measurements; no GPU run of this project has timed either path). The independent
    count of issue 25 prices the fused forward (Triton ``tl.dot`` tiles fed by cp.async, the softmax epilogue not
    overlapped with the next tile's MMA) at ``r_f`` = 1.66–1.84× one bf16 GEMM of ``2·n·D·V`` FLOPs, and the sweep
    (cuBLAS logits chunks + the Triton row kernel reading them back) at ``r_s`` = 1.10–1.14×. The sweep pays a
    fixed cost the fused kernel does not: ~5 launches per chunk and, without ``active_rows``, one host read of the
    active count — ``c`` ≈ 30 µs assumed. With a GEMM time ``t = 2·n·D·V / R`` at an effective ``R`` ≈ 600
    TFLOP/s (H100 bf16, assumed), the sweep wins when ``(r_f − r_s)·t > c``, i.e.
    ``2·n·D·V > c·R / (r_f − r_s)`` ≈ 30e-6 · 6e14 / 0.52 ≈ 3.5e10 at the closest ratios, ≈ 2.5e10 at the middle
    ones; ``FORWARD_SWEEP_MIN_FLOPS`` = 2^34 ≈ 1.7e10 (≈ 14 rows at D = 4096, V = 151936) takes the sweep a little
    earlier, since the sweep is also the path whose cost the count trusts more. Every call of the profiler or a
    trainer's scoring pass is far above it; tiny calls (tests, single-token decoding) keep the fused kernel. Env
    override ``T3S_FORWARD_SWEEP_MIN_FLOPS``. ``n_rows``: the active row count when ``active_rows`` is given, else
    all rows.
    """
    if strategy != "auto":
        return strategy == "chunked"
    return 2 * n_rows * D * V > _env_int("T3S_FORWARD_SWEEP_MIN_FLOPS", FORWARD_SWEEP_MIN_FLOPS)


def backend_for(impl: str, device: torch.device, dtype: torch.dtype, n_rows: int) -> str:
    """``"reference"`` (the oracle; also fp64 and empty calls), ``"triton"`` (CUDA, or the interpreter when asked
    for) or ``"torch"`` (the chunked path with torch row ops: ``impl="auto"`` off CUDA)."""
    backend = resolve_impl(impl, device)
    if impl == "auto" and backend == "reference" and device.type == "cpu":  # meta tensors keep the reference
        backend = "torch"
    if dtype == torch.float64 or n_rows == 0:
        backend = "reference"
    return backend


def master_weight_view(weight: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For paths that take one dtype (the reference, vocabulary-parallel shards): fp32 master weights under a half
    compute become fp32 tensors whose values are the weight rounded to the compute dtype, with the gradient flowing
    to the fp32 weight unrounded (straight-through), and ``hidden`` is upcast (exact)."""
    if weight.dtype == hidden.dtype:
        return weight, hidden
    rounded = weight.detach().to(hidden.dtype).to(weight.dtype)
    return weight + (rounded - weight.detach()), hidden.to(weight.dtype)


@dataclass(frozen=True)
class LossCall:
    """A validated :func:`~t3s_kernels.linear_cross_entropy` call after shifting and class-weight folding."""

    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    temperature: float
    return_lse: bool
    impl: str
    strategy: str
    workspace_bytes: int | None
    weight_grad_accumulation: str
    ignore_index: int


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _ce_per_token(nll, smooth, lse, eps: float, zl: float):
    """``(1 − ε)·nll + ε·smooth + z_loss·lse²`` per token (``smooth = lse − Σz/V``, used only when ε > 0)."""
    per_tok = (1.0 - eps) * nll
    if eps > 0:
        per_tok = per_tok + eps * smooth
    if zl > 0:
        per_tok = per_tok + zl * lse * lse
    return per_tok


def _reduce(per_tok, w, reduction: str, denominator):
    if w is not None:
        per_tok = per_tok * w
    if reduction == "none":
        return per_tok
    if reduction == "sum":
        return per_tok.sum()
    return per_tok.sum() / denominator(per_tok.dtype)


def _denominator_fn(normalizer, w, active, device):
    def denominator(dtype: torch.dtype) -> torch.Tensor | float:
        # 0 only when no weighted token is left (checked by the api): dividing by inf then gives a loss and
        # gradients of exactly 0, never NaN, and never the undivided sum
        if normalizer is not None and not isinstance(normalizer, torch.Tensor):
            return float(normalizer) or float("inf")  # a Python number: no host-to-device copy
        if normalizer is None:
            den = (w * active).sum() if w is not None else active.sum()
        else:
            den = normalizer.detach().reshape(()).to(device)
        den = den.to(dtype)
        return torch.where(den == 0, torch.full_like(den, float("inf")), den)

    return denominator


def lce_forward(hidden, weight, bias, y, w, call: LossCall, *, normalizer, active_rows, vp, stats_fn):
    """The loss of a validated call on ``[N]`` targets ``y`` and fp32 weights ``w`` (or ``None``); returns the loss
    and, when asked, the per-token ``lse`` ([N]). ``stats_fn``: the per-token primitive (the custom op under
    ``torch.compile``)."""
    V, D = weight.shape
    V = V if vp is None else vp.vocab_size
    h2 = rows_view(hidden)  # a view, or the strided [..., D] tensor the chunked sweep gathers from (no copy)
    N = row_count(hidden)
    if w is not None:  # weight 0 ≡ ignored: the primitive then skips the row
        y = torch.where(w != 0, y, torch.full_like(y, call.ignore_index))
    active = y != call.ignore_index
    eps, zl = call.label_smoothing, call.z_loss
    needs_grad = _needs_grad(hidden, weight, bias)
    denominator = _denominator_fn(normalizer, w, active, hidden.device)
    backend = backend_for(call.impl, hidden.device, hidden.dtype, N)
    n_rows = active_rows.numel() if active_rows is not None else N
    use_chunked = vp is None and not torch.compiler.is_compiling() and (backend == "torch" or (
        backend == "triton" and (forward_uses_sweep(call.strategy, n_rows, D, V) if not needs_grad
                                 else not training_uses_fused(call.strategy, n_rows, D, V))))
    if use_chunked:
        copts = ChunkedOptions(
            softcap=call.softcap, temperature=call.temperature, label_smoothing=eps, z_loss=zl, want_smooth=eps > 0,
            workspace_bytes=call.workspace_bytes, weight_grad_accumulation=call.weight_grad_accumulation,
            row_impl="triton" if backend == "triton" else "torch",
        )
        idx = active_row_index(active, active_rows)
        if needs_grad and call.reduction != "none" and not call.return_lse:
            # gradient in the forward: per-token coefficient of the reduced loss, w_i / denominator, on device
            coef = (w.float() if w is not None else torch.ones(N, dtype=torch.float32, device=hidden.device)) * active
            if call.reduction == "mean":
                coef = coef / denominator(torch.float32)
            return chunked_cross_entropy(h2, weight, bias, y, coef, idx, copts), None
        nll, lse, smooth, _, _ = chunked_token_stats(h2, weight, bias, y, idx, copts)
        return _reduce(_ce_per_token(nll, smooth, lse, eps, zl), w, call.reduction, denominator), lse
    sopts = StatsOptions(ignore_index=call.ignore_index, softcap=call.softcap, temperature=call.temperature,
                         want_sumz=eps > 0)
    lse, nll, sumz, _ = _primitive(h2, weight, bias, y, sopts, backend, vp, stats_fn)
    per_tok = _ce_per_token(nll, lse - sumz / V if eps > 0 else None, lse, eps, zl)  # fp32; 0 at inactive rows
    return _reduce(per_tok, w, call.reduction, denominator), lse


def _primitive(h2, weight, bias, y, sopts: StatsOptions, backend: str, vp, stats_fn):
    """The per-token primitive outside the chunked path: vocabulary-parallel shards, the compiled op, the fused
    Triton strategy and the reference (they take ``[N, D]``: a strided ``hidden`` is copied here)."""
    h2 = h2.reshape(-1, h2.shape[-1])
    if vp is not None or backend == "reference":
        weight, h2 = master_weight_view(weight, h2)
    if vp is not None:
        return vocab_parallel_token_stats(h2, weight, bias, y, sopts, backend, vp)
    return stats_fn(h2, weight, bias, y, sopts, backend)


def token_logprobs_forward(hidden, weight, bias, y, *, ignore_index, softcap, temperature, return_entropy,
                           return_accuracy, impl, strategy, active_rows, workspace_bytes, vp, stats_fn):
    """``(logprob, entropy | None, lse, accuracy | None)`` ``[N]`` of a validated :func:`token_logprobs` call."""
    V, D = weight.shape
    h2 = rows_view(hidden)  # a view, or the strided [..., D] tensor the chunked sweep gathers from (no copy)
    N = row_count(hidden)
    backend = backend_for(impl, hidden.device, hidden.dtype, N)
    needs_grad = _needs_grad(hidden, weight, bias)
    n_rows = active_rows.numel() if active_rows is not None else N
    sweep = (forward_uses_sweep(strategy, n_rows, D, V) if not needs_grad
             else not training_uses_fused(strategy, n_rows, D, V))
    sweep = sweep or (return_accuracy and strategy != "fused")  # the accuracy comes from the sweep only
    use_chunked = vp is None and not torch.compiler.is_compiling() and (
        backend == "torch" or (backend == "triton" and sweep))
    if return_accuracy and not use_chunked:
        raise ValueError(
            "token_logprobs: return_accuracy=True comes from the chunked statistics sweep: use impl='auto' or "
            "'triton' with float16 / bfloat16 / float32 inputs, without vocab_parallel and outside torch.compile"
        )
    if use_chunked:
        copts = ChunkedOptions(
            softcap=softcap, temperature=float(temperature), want_entropy=bool(return_entropy),
            want_accuracy=bool(return_accuracy), workspace_bytes=workspace_bytes,
            row_impl="triton" if backend == "triton" else "torch",
        )
        idx = active_row_index(y != ignore_index, active_rows)
        nll, lse, _, ent, acc = chunked_token_stats(h2, weight, bias, y, idx, copts)
        return -nll, ent, lse, acc
    sopts = StatsOptions(ignore_index=ignore_index, softcap=softcap, temperature=float(temperature),
                         want_sumz=False, want_entropy=bool(return_entropy))
    lse, nll, _, ent = _primitive(h2, weight, bias, y, sopts, backend, vp, stats_fn)
    return -nll, ent, lse, None


def _shift_targets(targets, token_weight, shift: int, ignore_index: int):
    """Position ``t`` is scored against ``targets[..., t + shift]``; the last ``shift`` positions have no target."""
    n_pad = min(shift, targets.shape[-1])
    pad = targets.new_full((*targets.shape[:-1], n_pad), ignore_index)
    targets = torch.cat([targets[..., shift:], pad], dim=-1)
    if token_weight is not None:
        tw_pad = token_weight.new_zeros((*token_weight.shape[:-1], n_pad))
        token_weight = torch.cat([token_weight[..., shift:], tw_pad], dim=-1)
    return targets, token_weight


def linear_cross_entropy_eager(hidden, weight, targets, bias, call: LossCall, *, token_weight, class_weight,
                               normalizer, shift: int, active_rows, vp, stats_fn, fn: str):
    """A validated :func:`~t3s_kernels.linear_cross_entropy` call from its ``[...]`` targets on: shift, fold the
    class weights, run :func:`lce_forward`, shape the outputs (also the body of the op ``t3s::lce_reduced``)."""
    if shift:
        targets, token_weight = _shift_targets(targets, token_weight, shift, call.ignore_index)
    if class_weight is not None:
        token_weight = _checks.fold_class_weight(class_weight, targets, token_weight, call.ignore_index)
    if normalizer is not None:
        _checks.check_normalizer_not_empty(normalizer, targets, token_weight, call.ignore_index, fn)
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = token_weight.reshape(-1).detach().to(acc_dtype) if token_weight is not None else None
    loss, lse = lce_forward(hidden, weight, bias, targets.reshape(-1), w, call, normalizer=normalizer,
                            active_rows=active_rows, vp=vp, stats_fn=stats_fn)
    n_scored = max(targets.shape[-1] - shift, 0) if shift else None  # positions kept by reduction="none" and lse
    if call.reduction == "none":
        loss = loss.reshape(targets.shape)[..., :n_scored] if shift else loss.reshape(targets.shape)
    if not call.return_lse:
        return loss
    lse = lse.reshape(targets.shape)
    return loss, (lse[..., :n_scored] if shift else lse)
