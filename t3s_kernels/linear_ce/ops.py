"""``torch.library`` custom ops so ``torch.compile(..., fullgraph=True)`` traces through the public functionals.

Under ``torch.compile`` (``torch.compiler.is_compiling()``), :func:`~t3s_kernels.linear_cross_entropy` and
:func:`~t3s_kernels.token_logprobs` call these ops instead of their eager bodies; eager calls never touch them. Each
op's implementation *is* the eager implementation (whatever strategy and backend it picks), so compiled and eager
numbers are the same, and the ops do not depend on the autograd Functions' internals. Every op has a fake (meta)
implementation, so tracing needs no data and nothing syncs with the host.

* ``t3s::lce_reduced`` — ``reduction="mean" | "sum"`` with gradients: one call runs the eager loss and
  ``torch.autograd.grad`` and returns ``(loss, dhidden, dweight, dbias)``; the registered backward multiplies them by
  the scalar upstream gradient. Cost: exactly the eager training cost (the chunked strategy already computes the
  gradients in its forward; the fused one runs its recompute backward inside the op).
* ``t3s::token_stats`` — the per-token primitive ``(lse, nll = lse − z_y, Σz, entropy)``, used for ``token_logprobs``,
  ``reduction="none"``, ``return_lse`` and every call without gradients (a single forward pass that stores
  nothing, as in eager). Its backward is ``t3s::token_stats_backward``, which *recomputes* the forward with autograd
  and back-propagates the given per-token upstream gradients: one more forward pass than eager's fused strategy
  (≈ +2·N·D·V FLOPs; eager's fused backward is itself a recompute, so this is ≈ 1.5× its backward cost).

Unused outputs (``Σz`` / entropy not asked for, gradients of inputs that need none) are returned as empty
``[0]`` tensors, since an op output cannot be ``None``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import LossCall, linear_cross_entropy_eager
from .function import StatsOptions, linear_token_stats

__all__ = ["lce_reduced", "token_stats"]


def _acc_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _autograd_inside_op():
    """Re-enable autograd inside an op's implementation (which runs below the Autograd dispatch key) so it can
    differentiate the eager implementation; only the autograd keys leave the excluded set (autocast stays out)."""
    dk = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (dk.AutogradCPU, dk.AutogradCUDA, dk.AutogradOther, dk.AutogradMeta, dk.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


# --------------------------------------------------------------------------------------------------------------
# per-token statistics
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("t3s::token_stats", mutates_args=())
def _token_stats_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, softcap: float | None,
    temperature: float, want_sumz: bool, want_entropy: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = StatsOptions(ignore_index=ignore_index, softcap=softcap, temperature=temperature, want_sumz=want_sumz,
                        want_entropy=want_entropy)
    with torch.no_grad():
        lse, nll, sumz, ent = linear_token_stats(hidden, weight, bias, targets, opts, backend)
    return (lse.clone(), nll.clone(), sumz.clone() if want_sumz else _empty(lse),
            ent.clone() if want_entropy else _empty(lse))


@_token_stats_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, softcap, temperature, want_sumz, want_entropy, backend):
    n = hidden.shape[0]
    f = hidden.new_empty((n,), dtype=_acc_dtype(hidden))
    return f, torch.empty_like(f), torch.empty_like(f) if want_sumz else f.new_empty((0,)), \
        torch.empty_like(f) if want_entropy else f.new_empty((0,))


@torch.library.custom_op("t3s::token_stats_backward", mutates_args=())
def _token_stats_backward_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, g_lse: Tensor, g_nll: Tensor,
    g_sumz: Tensor, g_ent: Tensor, ignore_index: int, softcap: float | None, temperature: float, want_sumz: bool,
    want_entropy: bool, backend: str, need_dh: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = StatsOptions(ignore_index=ignore_index, softcap=softcap, temperature=temperature, want_sumz=want_sumz,
                        want_entropy=want_entropy)
    h = hidden.detach().requires_grad_(need_dh)
    w = weight.detach().requires_grad_(need_dw)
    b = bias.detach().requires_grad_(need_db) if bias is not None else None
    leaves = [t for t, need in ((h, need_dh), (w, need_dw), (b, need_db)) if t is not None and need]
    if not leaves:
        return _empty(hidden), _empty(weight), _empty(weight)
    with _autograd_inside_op(), torch.enable_grad():
        lse, nll, sumz, ent = linear_token_stats(h, w, b, targets, opts, backend)
        outs, grads = [lse, nll], [g_lse, g_nll]
        if want_sumz:
            outs.append(sumz)
            grads.append(g_sumz)
        if want_entropy:
            outs.append(ent)
            grads.append(g_ent)
        got = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    got = iter(got)

    def take(t, need):
        if t is None or not need:
            return _empty(weight)
        g = next(got)
        return torch.zeros_like(t) if g is None else g

    dh, dw, db = take(h, need_dh), take(w, need_dw), take(b, need_db)
    return dh, dw, db


@_token_stats_backward_op.register_fake
def _(hidden, weight, bias, targets, g_lse, g_nll, g_sumz, g_ent, ignore_index, softcap, temperature, want_sumz,
      want_entropy, backend, need_dh, need_dw, need_db):
    dh = torch.empty_like(hidden) if need_dh else weight.new_empty((0,))
    dw = torch.empty_like(weight) if need_dw else weight.new_empty((0,))
    db = torch.empty_like(bias) if (need_db and bias is not None) else weight.new_empty((0,))
    return dh, dw, db


def _token_stats_setup(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, softcap, temperature, want_sumz, want_entropy, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, targets)
    ctx.args = (ignore_index, softcap, temperature, want_sumz, want_entropy, backend)
    ctx.has_bias = bias is not None


def _token_stats_backward(ctx, g_lse, g_nll, g_sumz, g_ent):
    hidden, weight, bias, targets = ctx.saved_tensors
    ignore_index, softcap, temperature, want_sumz, want_entropy, backend = ctx.args
    n = hidden.shape[0]
    zeros = hidden.new_zeros((n,), dtype=_acc_dtype(hidden))
    g_lse = zeros if g_lse is None else g_lse
    g_nll = zeros if g_nll is None else g_nll
    g_sumz = zeros if (g_sumz is None or not want_sumz) else g_sumz
    g_ent = zeros if (g_ent is None or not want_entropy) else g_ent
    need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dh, dw, db = torch.ops.t3s.token_stats_backward(
        hidden, weight, bias, targets, g_lse, g_nll, g_sumz, g_ent, ignore_index, softcap, temperature, want_sumz,
        want_entropy, backend, need_dh, need_dw, bool(need_db and ctx.has_bias),
    )
    return (dh if need_dh else None, dw if need_dw else None, db if (need_db and ctx.has_bias) else None,
            None, None, None, None, None, None, None)


_token_stats_op.register_autograd(_token_stats_backward, setup_context=_token_stats_setup)


def token_stats(hidden, weight, bias, targets, opts: StatsOptions, backend: str):
    """:func:`~t3s_kernels.linear_ce.function.linear_token_stats` through ``t3s::token_stats``."""
    lse, nll, sumz, ent = torch.ops.t3s.token_stats(
        hidden, weight, bias, targets, opts.ignore_index, opts.softcap, float(opts.temperature), opts.want_sumz,
        opts.want_entropy, backend,
    )
    return lse, nll, sumz if opts.want_sumz else None, ent if opts.want_entropy else None


# --------------------------------------------------------------------------------------------------------------
# reduced cross-entropy with gradients computed in the forward
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("t3s::lce_reduced", mutates_args=())
def _lce_reduced_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, token_weight: Tensor | None,
    class_weight: Tensor | None, normalizer: Tensor | None, normalizer_value: float | None, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: float | None, temperature: float, shift: int,
    impl: str, strategy: str, active_rows: Tensor | None, workspace_bytes: int | None,
    weight_grad_accumulation: str, need_dh: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    h = hidden.detach().requires_grad_(need_dh)
    w = weight.detach().requires_grad_(need_dw)
    b = bias.detach().requires_grad_(need_db) if bias is not None else None
    with _autograd_inside_op(), torch.enable_grad():
        call = LossCall(reduction, label_smoothing, z_loss, softcap, temperature, False, impl, strategy,
                        workspace_bytes, weight_grad_accumulation, ignore_index)
        loss = linear_cross_entropy_eager(
            h, w, targets, b, call, token_weight=token_weight, class_weight=class_weight,
            normalizer=normalizer if normalizer is not None else normalizer_value, shift=shift,
            active_rows=active_rows, vp=None, stats_fn=linear_token_stats, fn="linear_cross_entropy",
        )
        leaves = [t for t, need in ((h, need_dh), (w, need_dw), (b, need_db)) if t is not None and need]
        got = iter(torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else ())

    def take(t, need):
        if t is None or not need:
            return _empty(weight)
        g = next(got)
        return torch.zeros_like(t) if g is None else g

    return loss.detach().clone(), take(h, need_dh), take(w, need_dw), take(b, need_db)


@_lce_reduced_op.register_fake
def _(hidden, weight, bias, targets, token_weight, class_weight, normalizer, normalizer_value, ignore_index, reduction,
      label_smoothing, z_loss, softcap, temperature, shift, impl, strategy, active_rows, workspace_bytes,
      weight_grad_accumulation, need_dh, need_dw, need_db):
    loss = hidden.new_empty((), dtype=_acc_dtype(hidden))
    dh = torch.empty_like(hidden) if need_dh else weight.new_empty((0,))
    dw = torch.empty_like(weight) if need_dw else weight.new_empty((0,))
    db = torch.empty_like(bias) if (need_db and bias is not None) else weight.new_empty((0,))
    return loss, dh, dw, db


def _lce_reduced_setup(ctx, inputs, output):
    _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(dh, dw, db)


def _lce_reduced_backward(ctx, g_loss, _g_dh, _g_dw, _g_db):
    dh, dw, db = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]

    def scale(t, need):
        return t * g_loss.to(t.dtype) if need else None

    return (scale(dh, need_dh), scale(dw, need_dw), scale(db, need_db and ctx.has_bias),
            *([None] * 20))


_lce_reduced_op.register_autograd(_lce_reduced_backward, setup_context=_lce_reduced_setup)


def lce_reduced(hidden, weight, targets, *, bias, token_weight, class_weight, ignore_index, reduction, normalizer,
                label_smoothing, z_loss, softcap, temperature, shift, impl, strategy, active_rows=None,
                workspace_bytes=None, weight_grad_accumulation="weight_dtype") -> Tensor:
    """A ``"mean"`` / ``"sum"`` :func:`~t3s_kernels.linear_cross_entropy` through ``t3s::lce_reduced``."""
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    tensor_norm = normalizer if isinstance(normalizer, torch.Tensor) else None
    value_norm = None if normalizer is None or tensor_norm is not None else float(normalizer)
    loss, _, _, _ = torch.ops.t3s.lce_reduced(
        hidden, weight, bias, targets, token_weight, class_weight, tensor_norm, value_norm, ignore_index, reduction,
        float(label_smoothing), float(z_loss), softcap, float(temperature), int(shift), impl, strategy, active_rows,
        workspace_bytes, weight_grad_accumulation, *need,
    )
    return loss
