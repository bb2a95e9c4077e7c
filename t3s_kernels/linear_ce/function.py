"""Autograd glue between the public functionals and the Triton launchers.

* :class:`LinearTokenStatsFunction` — the fused strategy: per-token ``(lse, nll[, sumz][, entropy])`` in one
  pass that stores nothing ``[N, V]`` (``nll = lse − z_y`` formed relative to the row max, so it keeps its
  precision at large logits); the backward takes arbitrary upstream gradients of every statistic, recomputes
  the logits tile by tile and returns ``(dhidden, dweight, dbias)``.
* :class:`LinearCEChunkedFunction` — the chunked strategy for a reduced cross-entropy: the gradients are computed
  in the forward (the upstream gradient is a known per-token coefficient times a scalar), the backward only
  scales them by the scalar ``grad_output``.

Options travel as one frozen dataclass; every backward returns exactly one gradient slot per forward input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import reference_token_stats

__all__ = [
    "CEOptions",
    "LinearCEChunkedFunction",
    "LinearTokenStatsFunction",
    "StatsOptions",
    "chunked_cross_entropy",
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


@dataclass(frozen=True)
class CEOptions:
    """Options of the chunked (gradient-in-forward) cross-entropy."""

    ignore_index: int = -100
    softcap: float | None = None
    temperature: float = 1.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    chunk_bytes: int | None = None  # None: kernels.DEFAULT_CHUNK_BYTES (env T3S_CHUNK_BYTES overrides)


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
        lse, nll, sumz, ent = k.lce_stats_fwd(hidden, weight, bias, targets, row_order, n_active, opts)
        ctx.opts = opts
        ctx.save_for_backward(hidden, weight, bias, targets, row_order, n_active, lse, ent)
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
        hidden, weight, bias, targets, row_order, n_active, lse, ent = ctx.saved_tensors
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
        dh, dw, db = _kernels().lce_stats_bwd(
            hidden, weight, bias, targets, row_order, n_active, lse, ent, g_lse, g_tgt, g_sumz, g_ent, opts,
            need_dh=need_dh, need_dw=need_dw, need_db=need_db,
        )
        return dh, dw, db, None, None


class LinearCEChunkedFunction(torch.autograd.Function):
    """``(hidden, weight, bias, targets, coef [N] fp32) -> (Σ coefᵢ·lossᵢ, lse [N])``; gradients made in the
    forward, so the backward is a scalar multiply."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coef, opts: CEOptions):
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        loss_tok, lse, dh, dw, db = _kernels().lce_chunked(
            hidden, weight, bias, targets, coef, opts, need_dh=need_dh, need_dw=need_dw, need_db=need_db
        )
        loss = (loss_tok * coef).sum()
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        dh, dw, db = ctx.saved_tensors
        if g_loss is None:
            return None, None, None, None, None, None

        def scale(t):
            return None if t is None else t * g_loss.to(t.dtype)

        return scale(dh), scale(dw), scale(db), None, None, None


def linear_token_stats(hidden, weight, bias, targets, opts: StatsOptions, backend: str):
    """Dispatch the primitive: returns ``(lse, nll, sumz | None, entropy | None)`` as ``[N]`` tensors, ``nll = lse −
    z_y`` (the reference forms it from its own ``lse`` and ``tgt``; the kernels relative to the row max)."""
    if backend == "reference" or hidden.dtype == torch.float64 or hidden.shape[0] == 0:
        r = reference_token_stats(
            hidden, weight, targets, bias=bias, ignore_index=opts.ignore_index, softcap=opts.softcap,
            temperature=opts.temperature, want_sumz=opts.want_sumz, want_entropy=opts.want_entropy,
        )
        return r.lse, r.lse - r.tgt, r.sumz, r.entropy
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:  # one fused forward pass, nothing saved
        k = _kernels()
        row_order, n_active = k.active_rows(targets, opts.ignore_index)
        with torch.no_grad():
            return k.lce_stats_fwd(hidden, weight, bias, targets, row_order, n_active, opts)
    outs = list(LinearTokenStatsFunction.apply(hidden, weight, bias, targets, opts))
    lse, nll = outs[0], outs[1]
    sumz = outs[2] if opts.want_sumz else None
    ent = outs[-1] if opts.want_entropy else None
    return lse, nll, sumz, ent


def chunked_cross_entropy(hidden, weight, bias, targets, coef, opts: CEOptions):
    """Reduced cross-entropy ``Σ coefᵢ·lossᵢ`` and the (detached) per-token LSE with the chunked strategy."""
    return LinearCEChunkedFunction.apply(hidden, weight, bias, targets, coef.float().contiguous(), opts)
