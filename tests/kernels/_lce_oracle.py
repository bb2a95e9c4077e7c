"""Naive full-logits oracle for the linear-CE / token-logprob tests (shared by the three linear_ce test files).

Everything is written from the definitions with the whole ``[N, V]`` logits in memory: ``matmul_dtype`` is the
dtype of the ``hidden @ weight.T`` product, ``math_dtype`` the dtype of everything after it. The float64 oracle
is ``(float64, float64)``; the "plain PyTorch at the input dtype" baseline of ``assert_close_to_oracle`` is
``(input dtype, float32)``.
"""

from __future__ import annotations

import torch


def _logits(h, W, bias, softcap, temperature, matmul_dtype, math_dtype):
    x = (h.to(matmul_dtype) @ W.to(matmul_dtype).t()).to(math_dtype)
    if bias is not None:
        x = x + bias.to(math_dtype)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def naive_ce(
    hidden, weight, targets, *, bias=None, token_weight=None, ignore_index=-100, reduction="mean", normalizer=None,
    label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0, shift=False, return_lse=False,
    matmul_dtype=torch.float64, math_dtype=torch.float64,
):
    if shift:
        targets = torch.cat([targets[..., 1:], torch.full_like(targets[..., :1], ignore_index)], -1)
        if token_weight is not None:
            token_weight = torch.cat([token_weight[..., 1:], torch.zeros_like(token_weight[..., :1])], -1)
    shape = targets.shape
    D, V = hidden.shape[-1], weight.shape[0]
    z = _logits(hidden.reshape(-1, D), weight, bias, softcap, temperature, matmul_dtype, math_dtype)
    y = targets.reshape(-1)
    w = token_weight.reshape(-1).to(math_dtype) if token_weight is not None else torch.ones_like(z[:, 0])
    active = (y != ignore_index) & (w != 0)
    lse = torch.logsumexp(z, -1)
    tgt = z.gather(1, torch.where(active, y, 0).long()[:, None])[:, 0]
    per = (1 - label_smoothing) * (lse - tgt) + label_smoothing * (lse - z.sum(-1) / V) + z_loss * lse**2
    per = torch.where(active, per, torch.zeros_like(per)) * w
    lse = torch.where(active, lse, torch.zeros_like(lse))
    if reduction == "none":
        loss = per.reshape(shape)
        if shift:
            loss = loss[..., :-1]
    elif reduction == "sum":
        loss = per.sum()
    else:
        den = (w * active).sum() if normalizer is None else torch.as_tensor(normalizer, dtype=per.dtype)
        loss = per.sum() / den if float(den) != 0 else per.sum() * 0
    if not return_lse:
        return loss
    lse = lse.reshape(shape)
    return loss, lse[..., :-1] if shift else lse


def naive_token_logprobs(
    hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None, temperature=1.0,
    matmul_dtype=torch.float64, math_dtype=torch.float64,
):
    """``(logprob, entropy, lse)`` with the shape of ``targets``; 0 at ignored positions."""
    D = hidden.shape[-1]
    z = _logits(hidden.reshape(-1, D), weight, bias, softcap, temperature, matmul_dtype, math_dtype)
    y = targets.reshape(-1)
    active = y != ignore_index
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(1, torch.where(active, y, 0).long()[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    lse = torch.logsumexp(z, -1)
    zero = torch.zeros_like(lp)
    return tuple(torch.where(active, t, zero).reshape(targets.shape) for t in (lp, ent, lse))


def grads_of(fn, tensors, *, wrt=(0, 1, 2), upstream=None):
    """Run ``fn(*copies)`` on fresh copies of ``tensors`` where positions ``wrt`` (not None) require grad; backprop
    ``Σ outputs · upstream`` (ones by default). Returns ``(outputs detached, grads per position in wrt)``."""
    leaves = [None if t is None else t.detach().clone() for t in tensors]
    req = [i for i in wrt if leaves[i] is not None]
    for i in req:
        leaves[i].requires_grad_(True)
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    if upstream is None:
        upstream = [torch.ones_like(o) for o in outs]
    total = sum((o.double() * u.double()).sum() for o, u in zip(outs, upstream) if o is not None and u is not None)
    gs = torch.autograd.grad(total, [leaves[i] for i in req], allow_unused=True)
    by_pos = dict(zip(req, gs))
    grads = []
    for i in wrt:
        g = by_pos.get(i)
        if g is None and leaves[i] is not None:
            g = torch.zeros_like(leaves[i])
        grads.append(g)
    return tuple(o.detach() if o is not None else None for o in outs), grads


def check_against_oracle(ours, naive, args, names, dtype, *, upstream=None, out_shape=None, grad_dtype=None):
    """``ours(*args)`` -> fp32 outputs ``names``; outputs and gradients against the float64 oracle ``naive(*args)``,
    each within the budget of ``naive`` run at the input dtype (``matmul_dtype=dtype``, fp32 math).
    ``out_shape`` / ``grad_dtype``, when given, are asserted for every output / gradient."""
    from t3s_kernels.testing import assert_close_to_oracle

    out, grads = grads_of(ours, args, upstream=upstream)
    out_o, grads_o = grads_of(naive, args, upstream=upstream)
    out_b, grads_b = grads_of(lambda *a: naive(*a, matmul_dtype=dtype, math_dtype=torch.float32), args,
                              upstream=upstream)
    for name, a, o, bb in zip(names, out, out_o, out_b):
        assert a.dtype == torch.float32
        assert out_shape is None or a.shape == out_shape
        assert_close_to_oracle(name, a, o, bb, dtype=dtype)
    for name, a, o, bb in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_o, grads_b):
        if o is not None:
            assert grad_dtype is None or a.dtype == grad_dtype
            assert_close_to_oracle(name, a, o, bb, dtype=dtype)
    return out, grads


def check_ce_against_oracle(ours, h, W, b, y, dtype, *, upstream=None, **naive_kw):
    """``ours(h, W, b) -> (loss, lse)``: outputs (fp32) and gradients (input dtype) against the float64 oracle,
    each within the budget of the same-dtype PyTorch baseline (``naive_ce`` with ``naive_kw``)."""

    def naive(h_, W_, b_, **dt):
        return naive_ce(h_, W_, y, bias=b_, **naive_kw, **dt)

    return check_against_oracle(ours, naive, (h, W, b), ("loss", "lse"), dtype, upstream=upstream, grad_dtype=dtype)


def condition(naive, h, W, b, upstream, n_outputs: int) -> list[float]:
    """First-order magnitude each checked value is computed from (fp64, from the oracle): rounding every raw logit
    ``x = h·Wᵀ + b`` by ``u·(|h|·|Wᵀ| + |b|)`` moves output ``j`` by at most ``u·Σ|∂o_j/∂x|·(|h|·|Wᵀ| + |b|)``
    (per token for per-token outputs), and the final GEMMs of the gradients sum terms of size ``|dx|·|W|``,
    ``|dx|ᵀ·|h|``, ``|dx|``. Where such a sum cancels, its result is far smaller than its terms and a few ulps of
    the result alone would be no budget any dtype can meet."""
    h2 = h.double().reshape(-1, h.shape[-1])
    W64, b64 = W.double(), None if b is None else b.double()
    x = (h2 @ W64.t() + (0 if b64 is None else b64)).reshape(*h.shape[:-1], W.shape[0])
    mag = h2.abs() @ W64.abs().t() + (0 if b64 is None else b64.abs())
    x = x.detach().requires_grad_(True)
    identity = torch.eye(W.shape[0], dtype=torch.float64)
    outs = naive(x, identity, None)
    outs = outs if isinstance(outs, tuple) else (outs,)
    conds = []
    for o in outs[:n_outputs]:
        (g,) = torch.autograd.grad(o.sum(), x, retain_graph=True)  # per-token outputs: row i is ∂o_i/∂x_i
        conds.append(((g.abs().reshape(-1, W.shape[0]) * mag).sum(-1).max().item()) if g.numel() else 0.0)
    total = sum((o * u).sum() for o, u in zip(outs, upstream))
    (dx,) = torch.autograd.grad(total, x) if total.requires_grad else (torch.zeros_like(x),)
    dx = dx.reshape(-1, W.shape[0]).abs()
    grads = [(dx @ W64.abs()).max(), (dx.t() @ h2.abs()).max(), dx.sum(0).max()]
    return conds + [g.item() if g.numel() else 0.0 for g in grads]
