"""Noise levels of the union mask against an oracle written from their definition.

The three backends share ``sample_noise_levels``, so backend-vs-backend tests cannot see an error in it. The oracle
here re-derives t from the documented definition (DESIGN.md "Block diffusion"; ``research/anchors_block_diffusion.md``
§1.1 and §6.3; the docstrings of ``block_diffusion_union_mask`` and ``sample_noise_levels``) in float64, over the
library's Philox uniforms (``philox_uniform``, checked against ``tl.rand`` in test_union_mask.py):

* a unit is a block (``per_block``, blocks counted from each document's start, document-major order) or a document
  (``per_sequence``); its uniform ``u`` has counter ``(g_unit, step, 1, 0)``, ``g_unit`` the global index of its
  first token;
* ``iid``: ``t01 = u``; ``bd3lm``: ``t01 = ((u_i + i) / U) mod 1`` over all ``U`` units in order;
  ``stratified_perm``: the ``n`` active units (any maskable real token) take strata ``(rank + u) / n`` with the
  ranks a permutation of ``0..n-1`` ordered by the second Philox word of the same counter;
* ``t = eps_min + (eps_max − eps_min) · t01``, clipped to ``[eps_min, eps_max]``.
"""

from __future__ import annotations

import pytest
import torch

from t3s_kernels.block_diffusion import block_diffusion_union_mask
from t3s_kernels.block_diffusion.reference import philox4x32, philox_uniform

MASK = 999
BS = 4
# the library computes in float32: a handful of roundings of values in [0, 1]
T_ATOL = 4 * torch.finfo(torch.float32).eps


def documents_padded(valid: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each row of a padded batch: a row is one document, pads included."""
    B, L = valid.shape
    return [(b * L, L) for b in range(B)]


def documents_packed(cu: list[int]) -> list[tuple[int, int]]:
    return [(cu[d], cu[d + 1] - cu[d]) for d in range(len(cu) - 1)]


def oracle_noise_levels(docs, real_maskable, *, t_mode, sampler, eps_min, eps_max, seed, step, token_offset):
    """float64 t of every block (document-major), from the definition (plain loops)."""
    units = []  # (first token's flat index, flat indices of its tokens)
    block_unit = []  # unit of each block
    for start, n in docs:
        n_blocks = -(-n // BS)
        if t_mode == "per_sequence":
            units.append((start, range(start, start + n)))
            block_unit += [len(units) - 1] * n_blocks
        else:
            for k in range(n_blocks):
                a = start + k * BS
                units.append((a, range(a, min(a + BS, start + n))))
                block_unit.append(len(units) - 1)
    U = len(units)
    g = torch.tensor([token_offset + first for first, _ in units], dtype=torch.int64)
    u = philox_uniform(seed, step, g, stream=1).double()
    if sampler == "iid":
        t01 = u.clone()
    elif sampler == "bd3lm":
        t01 = torch.tensor([((float(u[i]) + i) / U) % 1.0 for i in range(U)], dtype=torch.float64)
    else:  # stratified_perm
        t01 = u.clone()
        active = [i for i, (_, toks) in enumerate(units) if any(bool(real_maskable[j]) for j in toks)]
        perm_key = philox4x32(g, step, 1, 0, seed & 0xFFFFFFFF, seed >> 32)[1]
        by_key = sorted(active, key=lambda i: (int(perm_key[i]), active.index(i)))
        for rank, i in enumerate(by_key):
            t01[i] = (rank + float(u[i])) / len(active)
    t = (eps_min + (eps_max - eps_min) * t01).clamp(eps_min, eps_max)
    return t[torch.tensor(block_unit, dtype=torch.int64)]


def padded_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 23
    ids = torch.randint(0, 500, (B, L), generator=g)
    maskable = torch.zeros(B, L, dtype=torch.bool)
    maskable[:, 9:] = True  # the first two blocks of every row are prompt: inactive units
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 15:] = False  # the last two blocks of row 1 are pad: inactive
    return ids, maskable, valid


CASES = [
    pytest.param(t_mode, sampler, eps, id=f"{t_mode}-{sampler}-{eps[0]}-{eps[1]}")
    for t_mode in ("per_block", "per_sequence")
    for sampler in ("iid", "bd3lm", "stratified_perm")
    for eps in ((1e-3, 1.0), (0.3, 0.8))
] + [pytest.param("per_block", "stratified_perm", (0.5, 0.5), id="degenerate-window")]


@pytest.mark.parametrize("t_mode,sampler,eps", CASES)
def test_noise_levels_padded_match_definition(t_mode, sampler, eps):
    ids, maskable, valid = padded_case()
    seed, step, offset = (1 << 40) + 12345, 17, 1000
    out = block_diffusion_union_mask(
        ids, maskable, valid=valid, block_size=BS, mask_token_id=MASK, eps_min=eps[0], eps_max=eps[1],
        t_mode=t_mode, sampler=sampler, seed=seed, step=step, token_offset=offset, impl="reference",
    )  # fmt: skip
    ref = oracle_noise_levels(
        documents_padded(valid), (maskable & valid).reshape(-1), t_mode=t_mode, sampler=sampler,
        eps_min=eps[0], eps_max=eps[1], seed=seed, step=step, token_offset=offset,
    )  # fmt: skip
    assert out.t.dtype == torch.float32 and out.t.shape == ref.shape
    torch.testing.assert_close(out.t.double(), ref, rtol=0, atol=T_ATOL)
    assert bool(((out.t >= eps[0]) & (out.t <= eps[1])).all())


@pytest.mark.parametrize("sampler", ["iid", "bd3lm", "stratified_perm"])
@pytest.mark.parametrize("t_mode", ["per_block", "per_sequence"])
def test_noise_levels_packed_match_definition(t_mode, sampler):
    """Packed documents of odd lengths (blocks restart at each document), a tail of pad, a prompt-only document."""
    g = torch.Generator().manual_seed(3)
    cu = [0, 7, 9, 22, 31]
    T = 34
    ids = torch.randint(0, 500, (T,), generator=g)
    maskable = torch.rand(T, generator=g) < 0.6
    maskable[7:9] = False  # document 1 is all prompt
    maskable[31:] = False
    seed, step, offset = 7, 3, 64
    out = block_diffusion_union_mask(
        ids, maskable, cu_seqlens=torch.tensor(cu), block_size=BS, mask_token_id=MASK, eps_min=0.05, eps_max=0.95,
        t_mode=t_mode, sampler=sampler, seed=seed, step=step, token_offset=offset, impl="reference",
    )  # fmt: skip
    ref = oracle_noise_levels(
        documents_packed(cu), maskable, t_mode=t_mode, sampler=sampler, eps_min=0.05, eps_max=0.95, seed=seed,
        step=step, token_offset=offset,
    )  # fmt: skip
    torch.testing.assert_close(out.t.double(), ref, rtol=0, atol=T_ATOL)


def test_stratified_strata_are_a_permutation():
    """The definition's invariant on the library's own output: each active unit's stratum ``floor(t01 · n)`` is
    distinct and the strata are exactly ``0..n-1`` (independent of how the permutation is keyed)."""
    ids, maskable, valid = padded_case(seed=5)
    out = block_diffusion_union_mask(
        ids, maskable, valid=valid, block_size=BS, mask_token_id=MASK, eps_min=0.0, eps_max=1.0,
        sampler="stratified_perm", seed=11, step=2, impl="reference",
    )  # fmt: skip
    L, rm = ids.shape[1], (maskable & valid).tolist()
    active = torch.tensor([any(rm[b][k * BS : (k + 1) * BS]) for b in range(3) for k in range(-(-L // BS))])
    n = int(active.sum())
    strata = torch.floor(out.t[active].double() * n).long()
    assert sorted(strata.tolist()) == list(range(n))
