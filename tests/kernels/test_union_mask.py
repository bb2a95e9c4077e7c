"""block_diffusion_union_mask: Triton kernel (interpreter on CPU) == pure-PyTorch reference, and the edge cases of
``research/anchors_block_diffusion.md`` §6.5 checked against the definition (not against another backend)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _union_mask_compare import assert_same

from t3s_kernels._triton import HAS_TRITON
from t3s_kernels.block_diffusion import (
    FORCED,
    PAD,
    PROMPT,
    RANDOM,
    RANDOM_TARGET,
    VISIBLE,
    block_diffusion_union_mask,
)
from t3s_kernels.block_diffusion import kernels as bd_kernels
from t3s_kernels.block_diffusion.reference import philox_uniform

MASK = 999


def padded_batch(B=3, L=37, prompt=5, pad_row=1, pad_from=30, rho=0.2, seed=0, dtype=torch.int64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (B, L), generator=g).to(dtype)
    maskable = torch.zeros(B, L, dtype=torch.bool)
    maskable[:, prompt:] = True
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[pad_row, pad_from:] = False
    maskable &= valid
    targets = torch.rand(B, L, generator=g) < rho
    return [x.to(device) for x in (ids, maskable, valid, targets)]


def semantics_check(out, ids, maskable, valid, targets, block_size, mask_id=MASK):
    """Check the outputs against the definition, token by token, given the returned t."""
    code, w, noisy = out.code.reshape(-1), out.loss_weight.reshape(-1), out.noisy_ids.reshape(-1)
    v = valid.reshape(-1) if valid is not None else torch.ones_like(code, dtype=torch.bool)
    r = maskable.reshape(-1) & v
    b = targets.reshape(-1) & r if targets is not None else torch.zeros_like(r)
    assert bool((code[~v] == PAD).all()) and bool((code[v & ~r] == PROMPT).all())
    assert bool((w[~r] == 0).all()) and torch.equal(noisy[~r], ids.reshape(-1)[~r])
    union = (code == RANDOM) | (code == RANDOM_TARGET) | (code == FORCED)
    assert torch.equal(union & b, b)  # every target is masked
    assert torch.equal(noisy == mask_id, union) or bool((ids.reshape(-1) == mask_id).any())
    assert bool((code[b] != VISIBLE).all()) and bool((code[b] != RANDOM).all())
    assert bool((w[union] > 0).all()) and bool((w[~union] == 0).all())


# ---------------------------------------------------------------------------------------------------------------
# Philox: the reference's PyTorch Philox is Triton's tl.rand, bit for bit


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("seed,step", [(0, 0), (1, 3), (2**40 + 7, 2**20 + 1), (2**63 - 1, 2**31 - 1)])
def test_philox_reference_equals_tl_rand(seed, step, device):
    import triton
    import triton.language as tl

    @triton.jit
    def _rand_kernel(out_ptr, seed, base, N: tl.constexpr):
        o = tl.arange(0, N).to(tl.int64)
        tl.store(out_ptr + o, tl.rand(seed, base + o))

    out = torch.empty(256, device=device)
    _rand_kernel[(1,)](out, seed, (step << 32) + 12345, N=256)
    ref = philox_uniform(seed, step, 12345 + torch.arange(256, device=device))
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------------------------
# Triton == reference


CASES = [
    pytest.param(dict(block_size=4), id="padded-bs4"),
    pytest.param(dict(block_size=5, t_mode="per_sequence"), id="bs5-not-pow2-per-seq"),
    pytest.param(dict(block_size=1, sampler="iid"), id="bs1"),
    pytest.param(dict(block_size=8, weight_mode="elbo_naive", complementary=True, eps_max=0.9), id="comp-elbo"),
    pytest.param(dict(block_size=3, weight_mode="uniform", sampler="bd3lm", complementary=True), id="comp-uniform"),
    pytest.param(dict(block_size=16, target_weight=0.5, seed=7, step=11, token_offset=1000), id="bs16-offset"),
]


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("kw", CASES)
def test_triton_matches_reference_padded(kw, device, poison_empty):
    ids, maskable, valid, targets = padded_batch(device=device)
    common = dict(mask_token_id=MASK, targets=targets, valid=valid, **kw)
    ref = block_diffusion_union_mask(ids.cpu(), maskable.cpu(), **{**common, "targets": targets.cpu(),
                                     "valid": valid.cpu()}, impl="reference")  # fmt: skip
    tri = block_diffusion_union_mask(ids, maskable, **common, impl="triton")
    assert_same(ref, tri)
    semantics_check(ref, ids.cpu(), maskable.cpu(), valid.cpu(), targets.cpu(), kw["block_size"])


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_triton_matches_reference_packed(ids_dtype, device, poison_empty):
    T = 61
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (T,), generator=g).to(ids_dtype)
    cu = torch.tensor([0, 9, 9, 30, 52])  # an empty document, a partial last block, 9 pad tokens at the end
    maskable = torch.rand(T, generator=g) < 0.7
    targets = torch.rand(T, generator=g) < 0.3
    kw = dict(block_size=4, mask_token_id=MASK, targets=targets, cu_seqlens=cu, seed=3, step=2, complementary=True)
    ref = block_diffusion_union_mask(ids, maskable, **kw, impl="reference")
    tri = block_diffusion_union_mask(ids.to(device), maskable.to(device), **{**kw, "targets": targets.to(device),
                                     "cu_seqlens": cu.to(device)}, impl="triton")  # fmt: skip
    assert_same(ref, tri)
    assert bool((ref.code[52:] == PAD).all()) and torch.equal(ref.noisy_ids[52:], ids[52:])
    assert ref.noisy_ids.dtype == ids_dtype
    assert ref.block_ptr.tolist() == [0, 3, 3, 9, 15]


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_aligned_rows(device):
    """L % 16 == 0 takes the ALIGNED specialisation of the kernel."""
    ids, maskable, valid, targets = padded_batch(B=2, L=48, device=device)
    kw = dict(block_size=16, mask_token_id=MASK, targets=targets, valid=valid, seed=21, step=4)
    tri = block_diffusion_union_mask(ids, maskable, **kw, impl="triton")
    ref = block_diffusion_union_mask(ids.cpu(), maskable.cpu(), **{**kw, "targets": targets.cpu(),
                                     "valid": valid.cpu()}, impl="reference")  # fmt: skip
    assert_same(ref, tri)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_tiling_invariant(monkeypatch, device):
    ids, maskable, valid, targets = padded_batch(B=2, L=70, device=device)
    kw = dict(block_size=4, mask_token_id=MASK, targets=targets, valid=valid, seed=9, impl="triton")
    a = block_diffusion_union_mask(ids, maskable, **kw)
    monkeypatch.setattr(bd_kernels, "union_mask_triton",
                        functools.partial(bd_kernels.union_mask_triton, tokens_per_program=8))  # fmt: skip
    b = block_diffusion_union_mask(ids, maskable, **kw)
    assert_same(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Edge cases (§6.5), on the reference (= the CPU fallback)


def run(ids, maskable, **kw):
    kw.setdefault("mask_token_id", MASK)
    kw.setdefault("impl", "reference")
    return block_diffusion_union_mask(ids, maskable, **kw)


def test_partial_last_block_and_prompt_spanning_blocks():
    L, bs = 11, 4  # blocks [0,4) prompt only, [4,8) prompt tail + response, [8,11) partial
    ids = torch.arange(L).view(1, L)
    maskable = (torch.arange(L) >= 6).view(1, L)
    out = run(ids, maskable, block_size=bs, noise_level=torch.tensor([1.0, 1.0, 1.0]))
    assert out.block_ptr.tolist() == [0, 3]
    assert out.block_counts[:, 0].tolist() == [0, 2, 3]  # n_maskable per block (partial block: 3)
    assert out.code[0].tolist() == [PROMPT] * 6 + [RANDOM] * 5  # p = 1 masks every maskable token
    assert out.doc_counts[0].tolist() == [5, 5, 5, 0, 0]


def test_padding_never_masked():
    ids, maskable, valid, targets = padded_batch()
    maskable_all = torch.ones_like(maskable)  # even if the caller marks pads maskable, pads stay pads
    targets_all = torch.ones_like(targets)
    out = run(ids, maskable_all, valid=valid, targets=targets_all, block_size=4, eps_min=1.0, eps_max=1.0)
    assert bool((out.code[~valid] == PAD).all())
    assert bool((out.loss_weight[~valid] == 0).all())
    assert torch.equal(out.noisy_ids[~valid], ids[~valid])


def test_eos_fill_pads_are_maskable_when_marked():
    """LLaDA2 / dFactory "effective length": trailing EOS marked valid and maskable are ordinary response tokens."""
    L, eos = 12, 2
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, eos, eos, eos, eos, eos]])
    maskable = torch.arange(L).view(1, L) >= 3
    out = run(ids, maskable, block_size=4, eps_min=1.0, eps_max=1.0)  # EOS fill: valid defaults to all-real
    assert bool((out.code[0, 7:] == RANDOM).all())
    valid = torch.arange(L).view(1, L) < 7  # default LLaDA-free convention: pads never masked
    out = run(ids, maskable, valid=valid, block_size=4, eps_min=1.0, eps_max=1.0)
    assert bool((out.code[0, 7:] == PAD).all()) and out.doc_counts[0, 0] == 4


def test_packing_is_document_relative():
    """A packed document masks exactly like the same document alone (same global token indices)."""
    g = torch.Generator().manual_seed(2)
    lens = [7, 13, 10]
    T = sum(lens)
    ids = torch.randint(0, 500, (T,), generator=g)
    maskable = torch.rand(T, generator=g) < 0.8
    targets = torch.rand(T, generator=g) < 0.2
    cu = torch.tensor([0, 7, 20, 30])
    t_doc = torch.tensor([0.3, 0.6, 0.9])
    packed = run(ids, maskable, targets=targets, cu_seqlens=cu, block_size=4, t_mode="per_sequence",
                 noise_level=t_doc, seed=4, step=1)  # fmt: skip
    for d in range(3):
        s, e = int(cu[d]), int(cu[d + 1])
        alone = run(ids[s:e], maskable[s:e], targets=targets[s:e], block_size=4, t_mode="per_sequence",
                    noise_level=t_doc[d : d + 1], seed=4, step=1, token_offset=s)  # fmt: skip
        assert torch.equal(alone.noisy_ids, packed.noisy_ids[s:e])
        assert torch.equal(alone.code, packed.code[s:e])
        assert torch.equal(alone.block_counts, packed.block_counts[packed.block_ptr[d] : packed.block_ptr[d + 1]])
        # per-sequence t: one level for all blocks of the document
        assert bool((packed.t[packed.block_ptr[d] : packed.block_ptr[d + 1]] == t_doc[d]).all())


@pytest.mark.parametrize("t_mode", ["per_block", "per_sequence"])
@pytest.mark.parametrize("sampler", ["iid", "bd3lm", "stratified_perm"])
def test_t_clipping(t_mode, sampler):
    ids, maskable, valid, targets = padded_batch(B=4, L=40)
    out = run(ids, maskable, valid=valid, block_size=4, eps_min=0.3, eps_max=0.8, t_mode=t_mode, sampler=sampler)
    assert out.t.dtype == torch.float32
    assert bool(((out.t >= 0.3) & (out.t <= 0.8)).all())
    if t_mode == "per_sequence":
        for d in range(4):
            blk = out.t[out.block_ptr[d] : out.block_ptr[d + 1]]
            assert bool((blk == blk[0]).all())


def test_stratified_samplers_cover_each_stratum_once():
    ids, maskable, valid, _ = padded_batch(B=4, L=40, prompt=9)  # blocks 0, 1 are prompt only (inactive)
    out = run(ids, maskable, valid=valid, block_size=4, sampler="stratified_perm", eps_min=0.0, eps_max=1.0)
    active = out.block_counts[:, 0] > 0
    n = int(active.sum())
    strata = torch.floor(out.t[active].double() * n).long().clamp_max(n - 1)
    assert sorted(strata.tolist()) == list(range(n))
    # no banding: one sequence's blocks are not confined to a 1/B band (BD3-LM quirk, anchors note §1.1)
    first = out.t[out.block_ptr[0] : out.block_ptr[1]][2:]
    assert float(first.max() - first.min()) > 0.25
    bd = run(ids, maskable, valid=valid, block_size=4, sampler="bd3lm", eps_min=0.0, eps_max=1.0)
    nb = bd.t.numel()
    assert torch.floor(bd.t.double() * nb).long().clamp_max(nb - 1).tolist() == list(range(nb))


def test_no_random_mask_drawn():
    ids, maskable, valid, targets = padded_batch()
    out = run(ids, maskable, valid=valid, block_size=4, eps_min=0.0, eps_max=0.0)  # t = 0, no targets
    assert int(out.doc_counts.sum()) == int(out.doc_counts[:, 0].sum())  # only n_maskable is non-zero
    assert float(out.doc_weight_sum.sum()) == 0.0 and bool((out.loss_weight == 0).all())
    assert bool(torch.isfinite(out.loss_weight).all())
    out = run(ids, maskable, valid=valid, targets=targets, block_size=4, eps_min=0.0, eps_max=0.0)
    assert bool(((out.code == FORCED) == (targets & maskable)).all())
    assert bool((out.loss_weight[out.code == FORCED] == 1.0).all())


def test_targets_outside_response_are_dropped_and_counted():
    ids, maskable, valid, _ = padded_batch(B=2, L=20, prompt=6, pad_row=1, pad_from=15)
    targets = torch.zeros_like(maskable)
    targets[0, 2] = targets[1, 3] = targets[1, 17] = True  # prompt, prompt, pad
    targets[0, 10] = True  # a real target
    out = run(ids, maskable, valid=valid, targets=targets, block_size=4, eps_min=0.0, eps_max=0.0)
    assert out.targets_dropped.tolist() == [1, 2]
    assert out.code[0, 2] == PROMPT and out.code[1, 17] == PAD and out.code[0, 10] == FORCED
    assert out.doc_counts[:, 3].tolist() == [1, 0]


@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_all_tokens_targets(t):
    ids, maskable, valid, _ = padded_batch()
    out = run(ids, maskable, valid=valid, targets=torch.ones_like(maskable), block_size=4,
              eps_min=t, eps_max=t, target_weight=2.0)  # fmt: skip
    r = maskable & valid
    assert bool((out.noisy_ids[r] == MASK).all())
    assert set(out.code[r].unique().tolist()) <= {RANDOM_TARGET, FORCED}
    assert bool((out.loss_weight[r] == 2.0).all())  # random term vanishes; only λ remains


def test_ties_p0_p1():
    ids, maskable, valid, _ = padded_batch()
    r = maskable & valid
    one = run(ids, maskable, valid=valid, block_size=4, eps_min=1.0, eps_max=1.0)
    assert torch.equal(one.code == RANDOM, r) and bool((one.loss_weight[r] == 1.0).all())
    zero = run(ids, maskable, valid=valid, block_size=4, eps_min=0.0, eps_max=0.0, weight_mode="uniform")
    assert bool((zero.code[r] == VISIBLE).all())


def test_weight_modes_and_dtypes():
    ids, maskable, valid, targets = padded_batch(B=2, L=64)
    kw = dict(valid=valid, targets=targets, block_size=8, eps_min=1e-3, seed=5)
    split = run(ids, maskable, **kw)
    naive = run(ids, maskable, weight_mode="elbo_naive", **kw)
    uni = run(ids, maskable, weight_mode="uniform", **kw)
    assert torch.equal(split.code, naive.code) and torch.equal(split.code, uni.code)
    assert split.loss_weight.dtype == torch.float32
    tok_t = split.t[torch.arange(16).repeat_interleave(8)].view(2, 64)  # per-token t
    rand = split.code == RANDOM
    tgt = (split.code == RANDOM_TARGET) | (split.code == FORCED)
    assert torch.equal(split.loss_weight[rand], 1.0 / tok_t[rand])
    assert bool((split.loss_weight[tgt] == 1.0).all())
    assert torch.equal(naive.loss_weight[tgt], 1.0 / tok_t[tgt])
    assert bool((uni.loss_weight[rand | tgt] == 1.0).all())
    assert float(split.loss_weight.max()) <= 1000.0 + 1e-3


def test_complementary_view_partitions_random_part():
    ids, maskable, valid, targets = padded_batch(B=2, L=48)
    out = run(ids, maskable, valid=valid, targets=targets, block_size=4, complementary=True, eps_max=0.99)
    c = out.complement
    r = maskable & valid
    main_rand = (out.code == RANDOM) | (out.code == RANDOM_TARGET)
    comp_rand = (c.code == RANDOM) | (c.code == RANDOM_TARGET)
    assert torch.equal(main_rand ^ comp_rand, r)  # every maskable token is randomly masked in exactly one view
    b = targets & r
    assert bool((c.noisy_ids[b] == MASK).all()) and bool((out.noisy_ids[b] == MASK).all())
    assert torch.equal(out.block_counts[:, 1] + c.block_counts[:, 1], out.block_counts[:, 0])


def test_empirical_masked_ratio():
    """E|m'| / n = p + (1 − p)·ρ (anchors note §8.2)."""
    B, L, p, rho = 4, 4096, 0.3, 0.25
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 500, (B, L), generator=g)
    maskable = torch.ones(B, L, dtype=torch.bool)
    targets = torch.rand(B, L, generator=g) < rho
    out = block_diffusion_union_mask(ids, maskable, targets=targets, block_size=32, mask_token_id=MASK,
                                     eps_min=p, eps_max=p, seed=11)  # fmt: skip  (auto: the C++ op or reference)
    rho_hat = float(targets.float().mean())
    ratio = float(out.doc_counts[:, 2].sum()) / (B * L)
    sd = math.sqrt(p * (1 - p) * (1 - rho_hat) / (B * L))
    assert abs(ratio - (p + (1 - p) * rho_hat)) < 5 * sd
    assert abs(float(out.doc_counts[:, 1].sum()) / (B * L) - p) < 5 * math.sqrt(p * (1 - p) / (B * L))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_same_mask_whatever_the_batch_split(layout):
    """Rows (or packed documents) split into micro-batches with token_offset draw the full batch's mask."""
    ids, maskable, valid, targets = padded_batch(B=4, L=30)
    kw = dict(block_size=4, sampler="iid", seed=123, step=9)
    if layout == "padded":
        full = run(ids, maskable, valid=valid, targets=targets, **kw)
        parts = [run(ids[a:b], maskable[a:b], valid=valid[a:b], targets=targets[a:b], token_offset=a * 30, **kw)
                 for a, b in [(0, 1), (1, 4)]]  # fmt: skip
        for name in ("noisy_ids", "loss_weight", "code"):
            assert torch.equal(getattr(full, name), torch.cat([getattr(p, name) for p in parts]))
        assert torch.equal(full.t, torch.cat([p.t for p in parts]))
    else:
        flat = [x.reshape(-1) for x in (ids, maskable, targets)]
        cu = torch.tensor([0, 25, 60, 61, 120])
        full = run(flat[0], flat[1], targets=flat[2], cu_seqlens=cu, **kw)
        a = run(flat[0][:60], flat[1][:60], targets=flat[2][:60], cu_seqlens=cu[:3], **kw)
        b = run(flat[0][60:], flat[1][60:], targets=flat[2][60:], cu_seqlens=cu[2:] - 60, token_offset=60, **kw)
        for name in ("noisy_ids", "loss_weight", "code"):
            assert torch.equal(getattr(full, name), torch.cat([getattr(a, name), getattr(b, name)]))
    # a different step or seed gives a different mask
    other = run(ids, maskable, valid=valid, targets=targets, **{**kw, "step": 10})
    assert not torch.equal(other.code, run(ids, maskable, valid=valid, targets=targets, **kw).code)


def test_validation_errors():
    ids, maskable, valid, targets = padded_batch(B=2, L=8)
    with pytest.raises(TypeError, match="input_ids"):
        run(ids.float(), maskable, block_size=4)
    with pytest.raises(ValueError, match="maskable"):
        run(ids, maskable[:, :4], block_size=4)
    with pytest.raises(TypeError, match="targets"):
        run(ids, maskable, targets=targets.float(), block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        run(ids, maskable, block_size=0)
    with pytest.raises(ValueError, match="eps_min"):
        run(ids, maskable, block_size=4, eps_min=0.9, eps_max=0.1)
    with pytest.raises(ValueError, match="weight_mode"):
        run(ids, maskable, block_size=4, weight_mode="bogus")
    with pytest.raises(ValueError, match="impl"):
        run(ids, maskable, block_size=4, impl="bogus")
    with pytest.raises(ValueError, match="noise_level"):
        run(ids, maskable, block_size=4, noise_level=torch.ones(3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        run(ids.view(-1), maskable.view(-1), block_size=4, cu_seqlens=torch.tensor([0, 9, 4]))
    with pytest.raises(ValueError, match="elbo_naive"):
        run(ids, maskable, targets=targets, block_size=4, eps_min=0.0, weight_mode="elbo_naive")


def test_bench_cpu_smoke(tmp_path):
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from bench.union_mask import main

    assert main(["--cpu", "--seq-len", "128", "--batch", "1", "--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "union_mask.csv").exists()


@pytest.mark.triton
def test_union_mask_kernel_compiles_for_sm90():
    """The interpreter cannot see compiler-only errors or register spills: compile the union-mask kernel for sm_90
    (no GPU needed) in every launcher flag combination we ship, in a subprocess without TRITON_INTERPRET."""
    from _aot_compile import UNION_MASK_VARIANTS, has_ptxas, run_subprocess

    if not has_ptxas():
        pytest.skip("triton's bundled ptxas is not available")
    r = run_subprocess("union_mask", "int64", "int32")
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    for ids in ("int64", "int32"):
        for v in UNION_MASK_VARIANTS:
            assert f"_union_mask_fwd_kernel {ids}-{v[0]} REG " in r.stdout, r.stdout
    assert r.stdout.count("STACK 0") == 2 * len(UNION_MASK_VARIANTS), r.stdout


# ---------------------------------------------------------------------------------------------------------------
# mask_token_id: validated once, before dispatch, so every backend refuses the same ids with the same message
# (before: -1 was written as is, 3.7 became 3, 2**40 with int32 ids was written as 0 by the C++ op)

BAD_MASK_IDS = [
    pytest.param(-1, torch.int64, None, ValueError, "mask_token_id must be a token id >= 0", id="negative"),
    pytest.param(3.7, torch.int64, None, TypeError, "mask_token_id must be an int token id", id="float"),
    pytest.param(3.0, torch.int64, None, TypeError, "mask_token_id must be an int token id", id="integral-float"),
    pytest.param(True, torch.int64, None, TypeError, "mask_token_id must be an int token id", id="bool"),
    pytest.param("7", torch.int64, None, TypeError, "mask_token_id must be an int token id", id="str"),
    pytest.param(2**40, torch.int32, None, ValueError, "does not fit input_ids' dtype torch.int32", id="2**40-int32"),
    pytest.param(2**31, torch.int32, None, ValueError, "does not fit input_ids' dtype torch.int32", id="2**31-int32"),
    pytest.param(2**63, torch.int64, None, ValueError, "does not fit input_ids' dtype torch.int64", id="2**63-int64"),
    pytest.param(500, torch.int64, 500, ValueError, r"outside the vocabulary \[0, vocab_size=500\)", id=">=vocab"),
]
MASK_ID_IMPLS = ["reference", "cpp", pytest.param("triton", marks=[
    pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")])]


@pytest.mark.parametrize("mask_id,dtype,vocab,exc,match", BAD_MASK_IDS)
def test_bad_mask_token_id_same_error_in_every_backend(mask_id, dtype, vocab, exc, match):
    ids, maskable, valid, targets = padded_batch(B=2, L=8, dtype=dtype)
    messages = set()
    for impl in ("reference", "cpp", "triton", "auto"):
        with pytest.raises(exc, match=match) as err:
            block_diffusion_union_mask(ids, maskable, targets=targets, block_size=4, mask_token_id=mask_id,
                                       vocab_size=vocab, impl=impl)
        messages.add(str(err.value))
    assert len(messages) == 1


@pytest.mark.parametrize("impl", MASK_ID_IMPLS)
@pytest.mark.parametrize("dtype,mask_id", [(torch.int32, 2**31 - 1), (torch.int64, 2**40)])
def test_largest_mask_token_id_is_written_unchanged(impl, dtype, mask_id):
    if impl == "cpp":
        from t3s_kernels.block_diffusion.cpu import load_union_mask_op

        if load_union_mask_op() is None:
            pytest.skip("C++ union-mask op could not be built here")
    ids, maskable, valid, targets = padded_batch(B=2, L=8, dtype=dtype)
    out = block_diffusion_union_mask(ids, maskable, targets=targets, valid=valid, block_size=4,
                                     mask_token_id=mask_id, impl=impl)
    union = (out.code == RANDOM) | (out.code == RANDOM_TARGET) | (out.code == FORCED)
    assert bool(union.any()) and bool((out.noisy_ids[union] == mask_id).all())
    assert torch.equal(out.noisy_ids[~union], ids[~union])


def test_mask_token_id_accepts_integer_scalars_and_checks_vocab_size():
    np = pytest.importorskip("numpy")
    ids, maskable, valid, targets = padded_batch(B=2, L=8)
    a = run(ids, maskable, targets=targets, block_size=4, mask_token_id=np.int64(MASK), vocab_size=MASK + 1)
    b = run(ids, maskable, targets=targets, block_size=4, mask_token_id=torch.tensor(MASK))
    assert torch.equal(a.noisy_ids, b.noisy_ids) and bool((a.noisy_ids == MASK).any())
    with pytest.raises(TypeError, match="vocab_size must be None or an int"):
        run(ids, maskable, block_size=4, vocab_size=100.0)


def test_union_mask_refuses_meta_tensors_and_torch_func():
    ids, maskable, valid, targets = padded_batch(B=2, L=8)
    with pytest.raises(ValueError, match="block_diffusion_union_mask does not support meta tensors"):
        run(ids.to("meta"), maskable.to("meta"), block_size=4)
    with pytest.raises(TypeError, match="block_diffusion_union_mask does not support torch.func transforms"):
        torch.vmap(lambda i, m: run(i, m, block_size=4).noisy_ids)(ids, maskable)
