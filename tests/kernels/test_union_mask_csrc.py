"""csrc/union_mask.cpp (torch.ops.t3s.union_mask): the C++ CPU op, the Triton kernel (interpreter on CPU, compiled
on a GPU) and the pure-PyTorch reference give identical masks, bit for bit, for several seeds / steps / splits."""

from __future__ import annotations

import warnings

import pytest
import torch
from _union_mask_compare import assert_same

from t3s_kernels._triton import HAS_TRITON
from t3s_kernels.block_diffusion import block_diffusion_union_mask
from t3s_kernels.block_diffusion import cpu as bd_cpu

MASK = 7


@pytest.fixture(scope="module")
def cpp_op():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = bd_cpu.load_union_mask_op()
    if op is None:
        pytest.skip("C++ union-mask op could not be built here (no compiler); the reference fallback is tested below")
    return op


def batch(seed, B=3, L=45):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (B, L), generator=g)
    maskable = torch.rand(B, L, generator=g) < 0.8
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[-1, L - 6 :] = False
    targets = torch.rand(B, L, generator=g) < 0.15
    return ids, maskable, valid, targets


SETTINGS = [
    dict(seed=0, step=0, block_size=4),
    dict(seed=1, step=17, block_size=5, t_mode="per_sequence", complementary=True, eps_max=0.95),
    dict(seed=2**62 + 5, step=2**31 - 1, block_size=32, weight_mode="elbo_naive", token_offset=2**31),
    dict(seed=99, step=3, block_size=1, weight_mode="uniform", sampler="bd3lm"),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: f"seed{kw['seed']}-step{kw['step']}-bs{kw['block_size']}")
def test_cpp_equals_reference(cpp_op, kw):
    ids, maskable, valid, targets = batch(kw["seed"] % 1000)
    common = dict(mask_token_id=MASK, targets=targets, valid=valid, **kw)
    assert_same(block_diffusion_union_mask(ids, maskable, **common, impl="reference"),
         block_diffusion_union_mask(ids, maskable, **common, impl="cpp"))  # fmt: skip
    # int32 ids and "auto" on CPU take the C++ op too
    ids32 = ids.to(torch.int32)
    auto = block_diffusion_union_mask(ids32, maskable, **common)
    assert auto.noisy_ids.dtype == torch.int32
    assert_same(auto, block_diffusion_union_mask(ids32, maskable, **common, impl="reference"))


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("kw", SETTINGS[:3], ids=lambda kw: f"seed{kw['seed']}-step{kw['step']}")
def test_cpp_equals_triton(cpp_op, kw, device):
    """On CPU the Triton kernel runs under TRITON_INTERPRET=1; on a GPU it is the compiled kernel."""
    ids, maskable, valid, targets = batch(kw["seed"] % 1000)
    common = dict(mask_token_id=MASK, **kw)
    c = block_diffusion_union_mask(ids, maskable, targets=targets, valid=valid, **common, impl="cpp")
    t = block_diffusion_union_mask(ids.to(device), maskable.to(device), targets=targets.to(device),
                                   valid=valid.to(device), **common, impl="triton")  # fmt: skip
    assert_same(c, t)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_cpp_packed_splits(cpp_op, split):
    """A packed batch split into ``split`` micro-batches (documents kept whole) draws the full batch's mask."""
    ids, maskable, _, targets = batch(5, B=1, L=90)
    ids, maskable, targets = ids[0], maskable[0], targets[0]
    cu = torch.tensor([0, 13, 30, 31, 58, 90])
    kw = dict(block_size=4, mask_token_id=MASK, sampler="iid", seed=42, step=6, impl="cpp")
    full = block_diffusion_union_mask(ids, maskable, targets=targets, cu_seqlens=cu, **kw)
    ref = block_diffusion_union_mask(ids, maskable, targets=targets, cu_seqlens=cu, **{**kw, "impl": "reference"})
    assert_same(full, ref)
    bounds = {1: [0, 5], 2: [0, 2, 5], 3: [0, 1, 3, 5]}[split]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        s, e = int(cu[a]), int(cu[b])
        parts.append(block_diffusion_union_mask(ids[s:e], maskable[s:e], targets=targets[s:e],
                                                cu_seqlens=cu[a : b + 1] - s, token_offset=s, **kw))  # fmt: skip
    for f in ("noisy_ids", "loss_weight", "code"):
        assert torch.equal(getattr(full, f), torch.cat([getattr(p, f) for p in parts]))
    assert torch.equal(full.t, torch.cat([p.t for p in parts]))


def test_fallback_without_compiler(monkeypatch):
    """No C++ op -> one warning, then the reference runs (same result)."""
    monkeypatch.setattr(bd_cpu, "_STATE", {})
    monkeypatch.setenv("T3S_NO_CPP", "1")
    ids, maskable, valid, targets = batch(3)
    kw = dict(block_size=4, mask_token_id=MASK, targets=targets, valid=valid, seed=8)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        out = block_diffusion_union_mask(ids, maskable, **kw)
    assert_same(out, block_diffusion_union_mask(ids, maskable, **kw, impl="reference"))
    with pytest.raises(RuntimeError, match="cpp"):
        block_diffusion_union_mask(ids, maskable, **kw, impl="cpp")


def test_fallback_when_source_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(bd_cpu, "_STATE", {})
    monkeypatch.delenv("T3S_NO_CPP", raising=False)
    monkeypatch.setattr(bd_cpu, "csrc_path", lambda: tmp_path / "missing.cpp")
    with pytest.warns(RuntimeWarning, match="not found"):
        assert bd_cpu.load_union_mask_op() is None


@pytest.mark.gpu
def test_cuda_kernel_equals_cpp_large(cpp_op):
    ids, maskable, valid, targets = batch(11, B=4, L=4099)
    kw = dict(block_size=32, mask_token_id=MASK, seed=2024, step=5, complementary=True, eps_max=0.99)
    c = block_diffusion_union_mask(ids, maskable, targets=targets, valid=valid, **kw, impl="cpp")
    t = block_diffusion_union_mask(ids.cuda(), maskable.cuda(), targets=targets.cuda(), valid=valid.cuda(), **kw)
    assert_same(c, t)


def test_cpp_op_refuses_a_mask_id_its_ids_cannot_hold(cpp_op):
    """Called directly (bypassing the Python validation), the op refuses 2**40 for int32 ids instead of writing 0."""
    ids, maskable, _, _ = batch(4, B=1, L=8)
    ids = ids.to(torch.int32).reshape(-1)
    T = ids.numel()
    one = torch.ones(2, dtype=torch.float32)
    out = (torch.empty_like(ids), torch.empty(T), torch.empty(T, dtype=torch.uint8),
           torch.empty(2, 5, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="mask_token_id=1099511627776 must be a token id"):
        cpp_op(ids, maskable.reshape(-1).to(torch.uint8), None, None, torch.tensor([0]), torch.tensor([T]),
               torch.tensor([0, 2]), one, one, one, None, None, *out, None, None, None, None, 0, 0, 0, 2**40, 4)
