"""Pure-PyTorch reference for the per-token linear-softmax statistics: the CPU path and the test oracle.

Math (written from the definitions, not from the kernels): for a row ``h`` of the hidden states, the LM-head
weight ``W [V, D]`` and an optional bias ``b [V]``, the raw logits are ``x = h Wᵀ + b``; the transformed logits are
``z = cap(x) / temperature`` with ``cap(x) = softcap · tanh(x / softcap)`` when ``softcap`` is set (Gemma 2's
final-logit soft-capping, https://arxiv.org/abs/2408.00118) and ``cap(x) = x`` otherwise. Per token, in fp32
(fp64 for fp64 inputs)::

    lse     = log Σ_v exp(z_v)                        # log-partition function
    tgt     = z_y                                      # target logit;  log p(y) = tgt − lse
    sumz    = Σ_v z_v                                  # label smoothing: CE against the uniform distribution
    entropy = −Σ_v p_v log p_v = lse − Σ_v p_v z_v     # p = softmax(z)

Cross-entropy with label smoothing (Szegedy et al. 2016, https://arxiv.org/abs/1512.00567, as in
``torch.nn.functional.cross_entropy``) is ``(1 − ε)(lse − tgt) + ε(lse − sumz / V)``; the z-loss (PaLM,
https://arxiv.org/abs/2204.02311, §5) adds ``z_loss · lse²``.

Rows whose target equals ``ignore_index`` give 0 for every statistic and get no gradient.

Memory: rows are processed in chunks so that at most one ``[chunk, V]`` block of logits exists at a time; under
autograd each chunk is wrapped in ``torch.utils.checkpoint`` so the backward recomputes one chunk at a time
instead of keeping ``[N, V]`` activations. Gradients come from PyTorch autograd through these plain formulas.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["ReferenceStats", "reference_token_stats", "reference_chunk_rows"]

# Keep one [chunk, V] logits block (fp32) at or below this many bytes.
_CHUNK_BYTES = 16 * 2**20  # ~5 such temporaries live at once (x, z, exp, p, p*z): ~80 MiB peak


class ReferenceStats(NamedTuple):
    lse: torch.Tensor
    tgt: torch.Tensor
    sumz: torch.Tensor | None
    entropy: torch.Tensor | None


def reference_chunk_rows(V: int, itemsize: int = 4, budget_bytes: int = _CHUNK_BYTES) -> int:
    """Rows per chunk so that one ``[chunk, V]`` block of ``itemsize``-byte logits fits in ``budget_bytes``."""
    return max(1, budget_bytes // max(1, V * itemsize))


def _chunk_stats(h, w, b, y, active, softcap, temperature, want_sumz, want_entropy):
    x = h.to(w.dtype) @ w.t()  # [C, V] in the compute dtype
    if b is not None:
        x = x + b
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    y_safe = torch.where(active, y, torch.zeros_like(y))
    tgt = z.gather(-1, y_safe[:, None]).squeeze(-1)
    zero = torch.zeros_like(lse)
    out = [torch.where(active, lse, zero), torch.where(active, tgt, zero)]
    if want_sumz:
        out.append(torch.where(active, z.sum(-1), zero))
    if want_entropy:
        p = torch.softmax(z, dim=-1)
        out.append(torch.where(active, lse - (p * z).sum(-1), zero))
    return tuple(out)


def reference_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    want_sumz: bool = False,
    want_entropy: bool = False,
    chunk_rows: int | None = None,
) -> ReferenceStats:
    """Per-token ``lse, tgt, sumz, entropy`` of ``z = cap(hidden @ weight.T + bias) / temperature``.

    Args:
        hidden: ``[N, D]`` float. weight: ``[V, D]``. targets: ``[N]`` integer. bias: ``[V]`` or ``None``.
        chunk_rows: rows per chunk (default: one fp32 ``[chunk, V]`` block ≤ 16 MiB).

    Returns:
        :class:`ReferenceStats` of ``[N]`` tensors in fp32 (fp64 when the inputs are fp64); ``sumz`` / ``entropy``
        are ``None`` unless asked for. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    N, V = hidden.shape[0], weight.shape[0]
    cdt = torch.float64 if hidden.dtype == torch.float64 or weight.dtype == torch.float64 else torch.float32
    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    targets = targets.long()
    active = targets != ignore_index
    if chunk_rows is None:
        chunk_rows = reference_chunk_rows(V, torch.finfo(cdt).bits // 8)
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    pieces = []
    for start in range(0, max(N, 1), chunk_rows):  # N = 0 still runs once, so outputs stay in the autograd graph
        sl = slice(start, min(N, start + chunk_rows))
        args = (hidden[sl], w, b, targets[sl], active[sl], softcap, temperature, want_sumz, want_entropy)
        if track:
            pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_stats(*args))
    n_out = 2 + int(want_sumz) + int(want_entropy)
    cols = [torch.cat([p[k] for p in pieces]) if len(pieces) > 1 else pieces[0][k] for k in range(n_out)]
    lse, tgt = cols[0], cols[1]
    sumz = cols[2] if want_sumz else None
    entropy = cols[-1] if want_entropy else None
    return ReferenceStats(lse, tgt, sumz, entropy)
