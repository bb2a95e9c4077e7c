"""Vocabulary-parallel LM head: the per-token primitive over a weight sharded on the vocabulary across ranks.

Tensor-parallel LM heads (Megatron's ``VocabParallelEmbedding`` output layer, verl, CCE's ``VocabParallelOptions``)
give every rank of a process group the rows ``[vocab_start, vocab_end)`` of the weight and the *same* hidden states.
Each rank runs the local per-token primitive on its shard (``lse_r``, ``nll_r = lse_r − z_y`` when the target lives on
this shard, ``Σ_r z``, local entropy ``H_r``), then the ranks combine per token, never forming ``[N, V]`` logits and
exchanging only ``O(N)`` numbers:

    m      = max_r lse_r                                   (all-reduce max, a constant: lse is invariant to it)
    lse    = m + log Σ_r exp(lse_r − m)                    (every term ≤ 1, the sum ≥ 1: no overflow / underflow)
    nll    = log Σ_r exp(lse_r − m) + (m − lse_ρ) + nll_ρ   (ρ = the rank owning the target; nll = lse − z_y,
                                                            kept relative to row maxima so huge logits never cancel)
    Σz     = Σ_r Σz_r
    H      = lse − Σ_r π_r (lse_r − H_r),   π_r = exp(lse_r − lse)     (E_p[z] split by shard)

Gradients follow Megatron's convention: the combined loss is replicated (every rank computes the same value and
calls ``backward`` with the same upstream gradient), so the all-reduce-sum's backward is the identity, and the
hidden states enter through a "copy to the parallel region" whose backward all-reduces ``dhidden`` (each rank's
shard contributes ``dz_r W_r``). For that identity to be exact, local values may only feed all-reduces and only
replicated values may follow them (so ``E_p[z]`` is reduced as ``Σ_r exp(lse_r − m)(lse_r − H_r)`` and divided by
the reduced sum afterwards). The local weight and bias get exactly their shard's gradient. Upstream gradients
that differ across ranks are a misuse (they would not be the gradient of one replicated loss).

Usage: pass ``vocab_parallel=VocabParallel(group, vocab_start, vocab_end, vocab_size)`` with the local weight shard
to :func:`~t3s_kernels.linear_cross_entropy` / :func:`~t3s_kernels.token_logprobs`, or pass a ``DTensor`` weight
sharded on dim 0 over a 1-D mesh (:meth:`VocabParallel.from_dtensor` is applied for you). Targets are global ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .function import StatsOptions, linear_token_stats

__all__ = ["VocabParallel", "resolve_vocab_parallel", "vocab_parallel_token_stats"]


@dataclass(frozen=True)
class VocabParallel:
    """This rank's share of a vocabulary-sharded LM head.

    Attributes:
        group: the process group the vocabulary is sharded over (``None``: the default group).
        vocab_start, vocab_end: this rank's rows ``[vocab_start, vocab_end)`` of the global ``[V, D]`` weight.
        vocab_size: the global vocabulary size ``V`` (label smoothing divides ``Σz`` by it; targets are checked
            against it).
    """

    group: Any
    vocab_start: int
    vocab_end: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name in ("vocab_start", "vocab_end", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"VocabParallel.{name} must be an int, got {type(v).__name__}")
        if not (0 <= self.vocab_start <= self.vocab_end <= self.vocab_size) or self.vocab_size < 1:
            raise ValueError(
                "VocabParallel needs 0 <= vocab_start <= vocab_end <= vocab_size and vocab_size >= 1, got "
                f"[{self.vocab_start}, {self.vocab_end}) of {self.vocab_size}"
            )

    @property
    def local_size(self) -> int:
        return self.vocab_end - self.vocab_start

    @classmethod
    def even(cls, vocab_size: int, group: Any = None) -> VocabParallel:
        """Contiguous shards of ``ceil(V / world)`` rows (the last one shorter), as ``torch.chunk`` and
        ``DTensor``'s ``Shard(0)`` split; this rank's range."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        per = -(-vocab_size // world)
        start = min(vocab_size, rank * per)
        return cls(group, start, min(vocab_size, start + per), vocab_size)

    @classmethod
    def from_dtensor(cls, weight: Any, bias: Any = None) -> tuple[torch.Tensor, torch.Tensor | None, VocabParallel]:
        """``(local weight, local bias, VocabParallel)`` from a ``DTensor`` weight ``Shard(0)`` on a 1-D mesh.

        ``bias`` may be a ``DTensor`` with the same sharding or a replicated / plain ``[V]`` tensor (then this
        rank's slice is taken). The local views stay differentiable (gradients land on the ``DTensor``).
        """
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = weight.device_mesh
        if mesh.ndim != 1 or len(weight.placements) != 1 or weight.placements[0] != Shard(0):
            raise ValueError(
                f"vocabulary-parallel weight must be a DTensor sharded on dim 0 over a 1-D mesh (placements "
                f"(Shard(0),)), got mesh of {mesh.ndim} dims with placements {tuple(weight.placements)}"
            )
        shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
        vp = cls(mesh.get_group(), int(offset[0]), int(offset[0]) + int(shape[0]), int(weight.shape[0]))
        local_bias = bias
        if isinstance(bias, DTensor):
            if tuple(bias.placements) == (Shard(0),):
                local_bias = bias.to_local()
            else:
                local_bias = bias.full_tensor()[vp.vocab_start : vp.vocab_end]
        elif bias is not None:
            local_bias = bias[vp.vocab_start : vp.vocab_end] if bias.shape[0] == vp.vocab_size else bias
        return weight.to_local(), local_bias, vp


def resolve_vocab_parallel(
    weight: Any, bias: Any, vocab_parallel: VocabParallel | None, fn: str
) -> tuple[Any, Any, VocabParallel | None]:
    """Turn a ``DTensor`` weight into ``(local, bias, VocabParallel)``; validate an explicit option."""
    if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"{fn}: vocab_parallel must be a VocabParallel or None, got {type(vocab_parallel).__name__}")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return weight, bias, vocab_parallel
    if isinstance(weight, DTensor):
        if vocab_parallel is not None:
            raise ValueError(f"{fn}: pass either a DTensor weight or vocab_parallel=, not both")
        return VocabParallel.from_dtensor(weight, bias)
    if (vocab_parallel is not None and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.shape[0] != vocab_parallel.local_size):
        raise ValueError(
            f"{fn}: weight has {weight.shape[0]} rows but vocab_parallel gives this rank "
            f"[{vocab_parallel.vocab_start}, {vocab_parallel.vocab_end}) = {vocab_parallel.local_size} rows"
        )
    return weight, bias, vocab_parallel


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over the group. Backward: identity (the combined output is replicated on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToVocabParallel(torch.autograd.Function):
    """Forward: identity. Backward: sum over the group (each shard contributes part of ``dhidden``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def vocab_parallel_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    opts: StatsOptions,
    backend: str,
    vp: VocabParallel,
):
    """The primitive's ``(lse, nll, sumz | None, entropy | None)`` over the *global* vocabulary, ``[N]`` each.

    ``hidden`` ``[N, D]`` replicated, ``weight`` / ``bias`` this rank's shard, ``targets`` global ids. Inactive
    rows (``ignore_index``) give 0 for every output and no gradient, as the local primitive does.
    """
    if vp.local_size == 0:
        raise ValueError("vocabulary-parallel shard with no rows: every rank needs vocab_end > vocab_start")
    group = vp.group
    ignore = opts.ignore_index
    active = targets != ignore
    here = active & (targets >= vp.vocab_start) & (targets < vp.vocab_end)
    # Every active row is scored on every shard (its LSE is needed everywhere); a target that lives elsewhere is
    # replaced by local id 0 and its target logit dropped below.
    local_targets = torch.where(here, targets - vp.vocab_start, torch.zeros_like(targets))
    local_targets = torch.where(active, local_targets, torch.full_like(targets, ignore))
    h = _CopyToVocabParallel.apply(hidden, group) if hidden.requires_grad and torch.is_grad_enabled() else hidden
    want_entropy = opts.want_entropy
    lse_r, nll_r, sumz_r, ent_r = linear_token_stats(h, weight, bias, local_targets, opts, backend)

    m = lse_r.detach().clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    scaled = torch.exp(lse_r - m)  # in (0, 1]; 1 on the shard holding the max
    total = _AllReduceSum.apply(scaled, group)  # in [1, world]
    log_total = torch.log(total)
    lse = m + log_total
    # nll = lse − z_y = log total + (m − lse_r) + nll_r on the rank owning y: every term stays relative to a row
    # max, so huge logits never cancel (m is a constant of the expression's value, so treating it as one is exact)
    nll = _AllReduceSum.apply(torch.where(here, nll_r + (m - lse_r), torch.zeros_like(nll_r)), group) + log_total
    sumz = _AllReduceSum.apply(sumz_r, group) if opts.want_sumz else None
    ent = None
    if want_entropy:
        # E_p[z] = Σ_r π_r E_{p_r}[z] with π_r = exp(lse_r − m) / total. Local values only feed all-reduces and
        # only replicated values follow them, which is what makes the identity backward of the sum exact.
        mean_z = _AllReduceSum.apply(scaled * (lse_r - ent_r), group) / total
        ent = lse - mean_z
    zero = torch.zeros_like(lse)
    lse = torch.where(active, lse, zero)
    nll = torch.where(active, nll, zero)
    if sumz is not None:
        sumz = torch.where(active, sumz, zero)
    if ent is not None:
        ent = torch.where(active, ent, zero)
    return lse, nll, sumz, ent

