"""Autograd glue between the public functionals and the Triton launchers.

* :class:`LinearTokenStatsFunction` — the fused strategy: per-token ``(lse, nll[, sumz][, entropy])`` in one
  pass that stores nothing ``[N, V]`` (``nll = lse − z_y`` formed relative to the row max, so it keeps its
  precision at large logits); the backward takes arbitrary upstream gradients of every statistic,
  recomputes the logits tile by tile and returns ``(dhidden, dweight, dbias)``.
* :class:`ChunkedCEFunction` — the chunked path (:mod:`.chunked`) for a reduced cross-entropy: the gradients are
  computed in the forward (the upstream gradient is a known per-token coefficient times a scalar), the backward
  scales them in place by the scalar ``grad_output`` (6·n·D·V GEMM FLOPs in all).
* :class:`ChunkedStatsFunction` — the chunked path for per-token outputs (``reduction="none"``, differentiable
  ``lse``, ``token_logprobs``): the forward stores the per-token ``lse`` / entropy only, the backward recomputes
  the logits in GEMM-bound chunks for arbitrary upstream gradients (8·n·D·V in all).

Options travel as one frozen dataclass; every backward returns exactly one gradient slot per forward input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import chunked
from .chunked import ChunkedOptions
from .reference import reference_token_stats

__all__ = [
    "ChunkedCEFunction",
    "ChunkedOptions",
    "ChunkedStatsFunction",
    "LinearTokenStatsFunction",
    "StatsOptions",
    "chunked_cross_entropy",
    "chunked_token_stats",
    "linear_token_stats",
]


@dataclass(frozen=True)
class StatsOptions:
    """Options of the per-token primitive."""

    ignore_index: int = -100
    softcap: float | None = None
    temperature: float = 1.0
    want_sumz: bool = False
    want_entropy: bool = False


def _kernels():
    from . import kernels  # imported lazily: the reference path must work without triton

    return kernels


class LinearTokenStatsFunction(torch.autograd.Function):
    """``(hidden [N, D], weight [V, D], bias [V] | None, targets [N]) -> (lse, nll[, sumz][, entropy])``, fp32
    [N]; ``nll = lse − z_y``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: StatsOptions):
        k = _kernels()
        row_order, n_active = k.active_rows(targets, opts.ignore_index)
        w_k = _kernel_weight(weight, hidden)
        lse, nll, sumz, ent, rmax, logs = k.lce_stats_fwd(hidden, w_k, bias, targets, row_order, n_active, opts,
                                                          keep_relative=True)
        ctx.opts = opts
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(hidden, w_k, bias, targets, row_order, n_active, rmax, logs, ent)
        ctx.set_materialize_grads(False)
        outs = [lse, nll]
        if opts.want_sumz:
            outs.append(sumz)
        if opts.want_entropy:
            outs.append(ent)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        opts: StatsOptions = ctx.opts
        hidden, weight, bias, targets, row_order, n_active, rmax, logs, ent = ctx.saved_tensors
        grads = list(grads)
        g_lse, g_nll = grads[0], grads[1]
        # nll = lse − z_y: its gradient adds to the LSE's and enters the target logit's with the opposite sign
        g_tgt = None if g_nll is None else -g_nll
        if g_nll is not None:
            g_lse = g_nll if g_lse is None else g_lse + g_nll
        g_sumz = grads[2] if opts.want_sumz else None
        g_ent = grads[-1] if opts.want_entropy else None
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if all(g is None for g in (g_lse, g_tgt, g_sumz, g_ent)) or not (need_dh or need_dw or need_db):
            return None, None, None, None, None
        k = _kernels()
        if k.fused_backward_mode() == "chunked":
            dh, dw, db = _fused_backward_chunked(
                hidden, weight, bias, targets, (g_lse, g_tgt, g_sumz, g_ent), opts,
                need_dh=need_dh, need_dw=need_dw, need_db=need_db,
            )
            return dh, dw if dw is None else dw.to(ctx.weight_dtype), db, None, None
        dh, dw, db = k.lce_stats_bwd(
            hidden, weight, bias, targets, row_order, n_active, rmax, logs, ent, g_lse, g_tgt, g_sumz, g_ent, opts,
            need_dh=need_dh, need_dw=need_dw, need_db=need_db, dw_dtype=ctx.weight_dtype,
        )
        return dh, dw, db, None, None


def _kernel_weight(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The fused kernels read one operand dtype: fp32 master weights under a half compute are cast once (the
    gradient still accumulates in fp32 and is returned in fp32, see ``lce_stats_bwd``'s ``dw_dtype``)."""
    return weight if weight.dtype == hidden.dtype else weight.detach().to(hidden.dtype)


def _fused_backward_chunked(hidden, weight, bias, targets, g, opts: StatsOptions, *, need_dh, need_dw, need_db):
    """Backward of the fused primitive through the chunked sweep (``T3S_FUSED_BACKWARD=chunked``): active rows
    compacted (one host read of their count on CUDA), cuBLAS logits sub-chunks, the row kernel recomputes the
    statistics and writes ``dx``, torch GEMMs for ``dh`` / ``dW`` (bounded workspace)."""
    g_lse, g_tgt, g_sumz, g_ent = (None if t is None else t.detach().float() for t in g)
    idx = chunked.active_row_index(targets != opts.ignore_index, None)
    zero = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)

    def take(t, default=None):
        t = t if t is not None else default
        return None if t is None else (t if idx is None else t.index_select(0, idx))

    grads = chunked.RowGrads(take(g_lse, zero), take(g_tgt, zero), take(g_sumz), take(g_ent))
    copts = ChunkedOptions(softcap=opts.softcap, temperature=opts.temperature, row_impl="triton",
                           weight_grad_accumulation="fp32")
    return chunked.sweep_gradients(hidden, weight, bias, targets, idx, grads, copts,
                                   need_dh=need_dh, need_dw=need_dw, need_db=need_db)


def _scale_by_upstream(t: torch.Tensor, g_loss: torch.Tensor) -> None:
    """``t *= g_loss`` in place, skipped when ``g_loss`` is 1 (``loss.backward()``): on CPU the host reads it for
    free; on CUDA a Triton kernel reads it on the device and returns at once (no pass over ``dW``, no sync)."""
    if t.device.type == "cpu":
        if float(g_loss) != 1.0:
            t.mul_(g_loss.to(t.dtype))
        return
    _kernels().scale_unless_one(t, g_loss.detach().float())


class ChunkedCEFunction(torch.autograd.Function):
    """``(hidden [N, D], weight [V, D], bias [V] | None, targets [N], coef [N] fp32, idx [n] | None) ->
    Σ coefᵢ·lossᵢ`` (fp32 scalar); gradients formed in the forward, scaled in place in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coef, idx, opts: ChunkedOptions):
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        st, dh, dw, db = chunked.stats_and_grads(
            hidden, weight, bias, targets, idx, coef, opts, need_dh=need_dh, need_dw=need_dw, need_db=need_db
        )
        eps, zl = float(opts.label_smoothing), float(opts.z_loss)
        loss_tok = (1.0 - eps) * st.nll
        if eps > 0:
            loss_tok = loss_tok + eps * st.smooth
        if zl > 0:
            loss_tok = loss_tok + zl * st.lse * st.lse
        c = coef if idx is None else coef.index_select(0, idx)
        ctx.grads = (dh, dw, db)  # not inputs / outputs: kept as attributes, released after the backward
        return (loss_tok * c).sum()

    @staticmethod
    def backward(ctx, g_loss):
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(
                "linear_cross_entropy: the chunked path scales its stored gradients in place, so its backward runs "
                "once; retain_graph=True / a second backward through the same loss is not supported"
            )
        del ctx.grads
        for t in grads:
            if t is not None:
                _scale_by_upstream(t, g_loss)
        return grads[0], grads[1], grads[2], None, None, None, None


class ChunkedStatsFunction(torch.autograd.Function):
    """``(hidden, weight, bias, targets, idx, opts) -> (lse, nll[, smooth][, entropy])`` fp32 ``[N]`` (0 at inactive
    rows, the order of :class:`~.chunked.Stats`); stores ``lse`` / entropy, recomputes the logits in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, idx, opts: ChunkedOptions):
        N = chunked.row_count(hidden)
        st = chunked.stats_only(hidden, weight, bias, targets, idx, opts)
        full = [None if t is None else chunked.scatter_rows(t, idx, N) for t in st[:4]]
        ent_compact = st.entropy
        ctx.opts = opts
        ctx.save_for_backward(hidden, weight, bias, targets, idx, full[0], full[3] if ent_compact is not None else None,
                              st.row_max, st.log_s)
        ctx.set_materialize_grads(False)
        outs = tuple(t for t in full if t is not None)
        if st.accuracy is None:
            return outs
        acc = chunked.scatter_rows(st.accuracy, idx, N)
        ctx.mark_non_differentiable(acc)
        return (*outs, acc)

    @staticmethod
    def backward(ctx, *grads):
        opts: ChunkedOptions = ctx.opts
        hidden, weight, bias, targets, idx, lse, ent, row_max, log_s = ctx.saved_tensors
        grads = list(grads[:-1] if opts.want_accuracy else grads)  # the accuracy output has no gradient
        g_lse, g_nll = grads[0], grads[1]
        g_smooth = grads[2] if opts.want_smooth else None
        g_ent = grads[-1] if opts.want_entropy else None
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if all(g is None for g in (g_nll, g_lse, g_smooth, g_ent)) or not (need_dh or need_dw or need_db):
            return None, None, None, None, None, None
        dh, dw, db = chunked.recompute_backward(
            hidden, weight, bias, targets, idx, lse, ent, g_nll, g_lse, g_smooth, g_ent, opts,
            need_dh=need_dh, need_dw=need_dw, need_db=need_db, rel=None if row_max is None else (row_max, log_s),
        )
        return dh, dw, db, None, None, None


def chunked_token_stats(hidden, weight, bias, targets, idx, opts: ChunkedOptions):
    """Per-token ``(nll, lse, smooth | None, entropy | None, accuracy | None)`` ``[N]`` through the chunked path:
    an autograd Function when a gradient is needed, else one forward sweep that stores nothing."""
    N = chunked.row_count(hidden)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        outs = list(ChunkedStatsFunction.apply(hidden, weight, bias, targets, idx, opts))
        lse, nll = outs[0], outs[1]
        acc = outs.pop() if opts.want_accuracy else None
        smooth = outs[2] if opts.want_smooth else None
        ent = outs[-1] if opts.want_entropy else None
        return nll, lse, smooth, ent, acc
    with torch.no_grad():
        st = chunked.stats_only(hidden, weight, bias, targets, idx, opts)
    lse, nll, smooth, ent = (None if t is None else chunked.scatter_rows(t, idx, N) for t in st[:4])
    acc = None if st.accuracy is None else chunked.scatter_rows(st.accuracy, idx, N)
    return nll, lse, smooth, ent, acc


def linear_token_stats(hidden, weight, bias, targets, opts: StatsOptions, backend: str):
    """Dispatch the primitive: returns ``(lse, nll, sumz | None, entropy | None)`` as ``[N]`` tensors, ``nll = lse −
    z_y`` (the reference forms it from its own ``lse`` and ``tgt``; the kernels relative to the row max)."""
    if backend == "reference" or hidden.dtype == torch.float64 or hidden.shape[0] == 0:
        r = reference_token_stats(
            hidden, weight, targets, bias=bias, ignore_index=opts.ignore_index, softcap=opts.softcap,
            temperature=opts.temperature, want_sumz=opts.want_sumz, want_entropy=opts.want_entropy,
        )
        return r.lse, r.lse - r.tgt, r.sumz, r.entropy
    if backend == "torch":  # the chunked PyTorch path (impl="auto" off CUDA) in the primitive's shape
        copts = ChunkedOptions(softcap=opts.softcap, temperature=opts.temperature, want_smooth=opts.want_sumz,
                               want_entropy=opts.want_entropy, row_impl="torch")
        idx = chunked.active_row_index(targets != opts.ignore_index, None)
        nll, lse, smooth, ent, _ = chunked_token_stats(hidden, weight, bias, targets, idx, copts)
        sumz = (lse - smooth) * weight.shape[0] if smooth is not None else None  # smooth = lse − Σz / V
        return lse, nll, sumz, ent
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:  # one fused forward pass, nothing saved
        k = _kernels()
        row_order, n_active = k.active_rows(targets, opts.ignore_index)
        with torch.no_grad():
            return k.lce_stats_fwd(hidden, _kernel_weight(weight, hidden), bias, targets, row_order, n_active, opts)
    outs = list(LinearTokenStatsFunction.apply(hidden, weight, bias, targets, opts))
    lse, nll = outs[0], outs[1]
    sumz = outs[2] if opts.want_sumz else None
    ent = outs[-1] if opts.want_entropy else None
    return lse, nll, sumz, ent


def chunked_cross_entropy(hidden, weight, bias, targets, coef, idx, opts: ChunkedOptions):
    """Reduced cross-entropy ``Σ coefᵢ·lossᵢ`` through the chunked path, gradients formed in the forward."""
    return ChunkedCEFunction.apply(hidden, weight, bias, targets, coef.detach().float().contiguous(), idx, opts)
