"""Pure-PyTorch reference of the block-diffusion union mask: the CPU fallback and the test oracle.

Semantics (``research/anchors_block_diffusion.md`` §6; BD3-LM, Arriola et al. ICLR'25,
``kuleshov-group/bd3lms@1c3e8f4`` ``diffusion.py:502-536`` ``q_xt`` and ``768-789`` ``_sample_t``; T3S union
masking ``m' = m ∨ 1_B``). For token ``j`` of document ``d`` in block ``k = j // block_size`` (blocks counted
from the document start, partial last block allowed)::

    u_j   = Philox4x32-10 uniform keyed by (seed, step, global token index)      (see RNG layout below)
    m_j   = (u_j < p_{d,k}) ∧ maskable_j                                         (strict '<', as MDLM / LLaDA)
    m'_j  = m_j ∨ (target_j ∧ maskable_j)
    noisy = MASK where m', the clean id elsewhere

RNG layout (identical in the Triton kernel, the C++ op and here, bit for bit):

* token uniforms are exactly Triton's ``tl.rand(seed, offset)`` with the 64-bit offset
  ``offset = step · 2**32 + g``, ``g = token_offset + flat token index`` (``g < 2**32``). Written out: Philox4x32
  with 10 rounds, key ``(k0, k1) = (seed mod 2**32, seed >> 32)``, counter ``(c0, c1, c2, c3) = (g, step, 0, 0)``;
  the first output word ``x`` becomes a float32 in ``[0, 1)`` as Triton's ``uint_to_uniform_float`` does:
  ``x`` reinterpreted as int32, ``x = ~x if x < 0``, ``u = float32(x) * float32(4.6566127342e-10)``.
* noise levels are drawn from the same generator with counter ``(g_unit, step, 1, 0)`` where ``g_unit`` is the
  global index of the first token of the unit (block or document): a different stream, still launch-invariant.

Nothing here shares code with :mod:`.kernels` or ``csrc/union_mask.cpp``; never edit this file to match them.
"""

from __future__ import annotations

import torch

__all__ = [
    "CODE_NAMES",
    "FORCED",
    "PAD",
    "PROMPT",
    "RANDOM",
    "RANDOM_TARGET",
    "VISIBLE",
    "philox4x32",
    "philox_uniform",
    "sample_noise_levels",
    "union_mask_reference",
]

# Per-token class codes (uint8).
VISIBLE, RANDOM, RANDOM_TARGET, FORCED, PROMPT, PAD = 0, 1, 2, 3, 4, 5
CODE_NAMES = ("visible", "random", "random_target", "forced", "prompt", "pad")

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's scale: largest float with (2**31 - 1) * scale < 1 in float32


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * b`` for a constant ``a < 2**32`` and int64 tensor ``b < 2**32``, no overflow."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi & _M32, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, n_rounds: int = 10):
    """Philox4x32 (Salmon et al., SC'11) exactly as ``triton/language/random.py::philox_impl``.

    Counters are int64 tensors holding 32-bit values (broadcastable); keys are python ints. Returns 4 int64
    tensors of 32-bit words.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _M32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = int(k0) & _M32, int(k1) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words held in int64: float32 in ``[0, 1)``."""
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def philox_uniform(seed: int, step: int, index: torch.Tensor, stream: int = 0, word: int = 0) -> torch.Tensor:
    """float32 uniforms in ``[0, 1)`` for counters ``(index, step, stream, 0)`` under key ``seed`` (64-bit).

    ``stream=0, word=0`` is ``tl.rand(seed, step * 2**32 + index)``.
    """
    words = philox4x32(index, step, stream, 0, seed & _M32, (seed >> 32) & _M32)
    return _uint32_to_uniform(words[word])


def sample_noise_levels(
    unit_index: torch.Tensor,
    active: torch.Tensor,
    *,
    sampler: str,
    eps_min: float,
    eps_max: float,
    seed: int,
    step: int,
) -> torch.Tensor:
    """Noise levels ``t`` (float32) for noise units (blocks or documents), clipped to ``[eps_min, eps_max]``.

    Args:
        unit_index: int64 ``[U]`` global index of each unit's first token (keys the draw; launch-invariant).
        active: bool ``[U]`` whether the unit has any maskable token (only active units consume strata).
        sampler: ``"iid"`` — one uniform per unit (independent of how the batch is split);
            ``"bd3lm"`` — BD3-LM's antithetic sampler (``diffusion.py:776-781``): ``t_i = (u_i/U + i/U) mod 1``
            over all units in row-major order (each stratum once; a sequence's blocks share a band);
            ``"stratified_perm"`` — strata over the active units, randomly permuted (uniform marginals, every
            stratum once, no within-sequence banding; anchors note §6.3). The permutation ranks the active units by
            the second Philox word of their counter (stable sort), so it is launch-invariant too.
        Then ``t = eps_min + (eps_max − eps_min) · t01`` (the affine map of BD3-LM's ``_sample_t``), clipped.
    """
    n = unit_index.numel()
    u = philox_uniform(seed, step, unit_index, stream=1, word=0)
    if sampler == "iid":
        t = u
    elif sampler == "bd3lm":
        i = torch.arange(n, device=u.device, dtype=torch.float32)
        t = torch.remainder(u / max(n, 1) + i / max(n, 1), 1.0)
    elif sampler == "stratified_perm":
        t = u.clone()
        idx = torch.nonzero(active, as_tuple=False).flatten()
        n_act = idx.numel()
        if n_act:
            key = philox4x32(unit_index[idx], step, 1, 0, seed & _M32, (seed >> 32) & _M32)[1]
            rank = torch.empty_like(idx)
            rank[torch.argsort(key, stable=True)] = torch.arange(n_act, device=idx.device)
            t[idx] = (rank.to(torch.float32) + u[idx]) / n_act
    else:
        raise ValueError(f"sampler must be 'iid', 'bd3lm' or 'stratified_perm', got {sampler!r}")
    t = torch.clamp(t, 0.0, 1.0)
    return (eps_min + (eps_max - eps_min) * t).to(torch.float32).clamp_(eps_min, eps_max)


def _weights_for(t: torch.Tensor, weight_mode: str, target_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    one = torch.ones_like(t)
    if weight_mode == "t3s_split":
        return one / t, one * target_weight
    if weight_mode == "elbo_naive":
        return one / t, one / t
    return one, one  # uniform


@torch.no_grad()
def union_mask_reference(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    valid: torch.Tensor,
    targets: torch.Tensor,
    doc_start: torch.Tensor,
    doc_len: torch.Tensor,
    t_blk: torch.Tensor,
    *,
    block_size: int,
    mask_token_id: int,
    weight_mode: str,
    target_weight: float,
    seed: int,
    step: int,
    token_offset: int,
    complementary: bool,
):
    """Union mask over flat ``[T]`` tensors, one document at a time (plain loops; the oracle).

    ``doc_start`` / ``doc_len`` (int64 ``[N]``) give each document's span; blocks are numbered document by
    document (``t_blk`` float32 ``[NB]``, ``NB = Σ ceil(len_d / block_size)``). Tokens outside every document keep
    their id, weight 0 and code ``PAD``. Returns ``(noisy, weight, code, block_counts)`` and, when
    ``complementary``, the same four for the complementary view ``(¬m ∧ maskable) ∨ (target ∧ maskable)`` whose
    random tokens carry level ``1 − t`` (weight ``1/(1−t)`` under the ELBO modes).
    Block-count columns: n_maskable, n_random (``|m|``), n_union (``|m'|``), n_target, n_forced (``target ∧ ¬m``).
    """
    dev = input_ids.device
    T = input_ids.numel()
    views = [False, True] if complementary else [False]
    out = {}
    for comp in views:
        out[comp] = (
            input_ids.clone(),
            torch.zeros(T, dtype=torch.float32, device=dev),
            torch.full((T,), PAD, dtype=torch.uint8, device=dev),
            torch.zeros(t_blk.numel(), 5, dtype=torch.int32, device=dev),
        )
    blk = 0
    for d in range(doc_start.numel()):
        s, n = int(doc_start[d]), int(doc_len[d])
        for k in range((n + block_size - 1) // block_size):
            a, b = s + k * block_size, min(s + (k + 1) * block_size, s + n)
            pos = torch.arange(a, b, device=dev, dtype=torch.int64)
            real = valid[a:b].bool()
            r = maskable[a:b].bool() & real
            tgt = targets[a:b].bool() & r
            u = philox_uniform(seed, step, token_offset + pos)
            t = t_blk[blk : blk + 1].to(torch.float32)
            m = (u < t) & r
            for comp in views:
                noisy, weight, code, counts = out[comp]
                mm = (~m & r) if comp else m
                tt = (1.0 - t) if comp else t
                w_rand, w_tgt = _weights_for(tt, weight_mode, target_weight)
                union = mm | tgt
                noisy[a:b] = torch.where(union, torch.full_like(noisy[a:b], mask_token_id), input_ids[a:b])
                c = torch.full((b - a,), VISIBLE, dtype=torch.uint8, device=dev)
                c[mm & ~tgt] = RANDOM
                c[mm & tgt] = RANDOM_TARGET
                c[~mm & tgt] = FORCED
                c[real & ~r] = PROMPT
                c[~real] = PAD
                code[a:b] = c
                w = torch.zeros(b - a, dtype=torch.float32, device=dev)
                w[mm & ~tgt] = w_rand.expand(b - a)[mm & ~tgt]
                w[tgt] = w_tgt.expand(b - a)[tgt]
                weight[a:b] = w
                counts[blk] = torch.stack(
                    [r.sum(), mm.sum(), union.sum(), tgt.sum(), (tgt & ~mm).sum()]
                ).to(torch.int32)
            blk += 1
    main = out[False]
    return main, (out[True] if complementary else None)
