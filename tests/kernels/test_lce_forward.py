"""The fused forward (issue 8 / 14): 2-D grid over row blocks × vocabulary splits with a deterministic combine, the
loss kept relative to the row max (no cancellation at large logits), an accurate tanh for soft-capping, the split
rule, and the autotuner's ``reset_to_zero`` no longer hitting a placeholder. Oracles are float64; tolerances come
from precision (``assert_close_to_oracle``: 2× the same-dtype PyTorch error + a floor)."""

from __future__ import annotations

import math

import pytest
import torch
from _lce_oracle import grads_of, naive_ce, naive_token_logprobs

from t3s_kernels._triton import interpreting, tl, triton
from t3s_kernels.linear_ce import kernels as K
from t3s_kernels.linear_ce import linear_cross_entropy, token_logprobs
from t3s_kernels.testing import assert_close_to_oracle

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.triton


def _need_interpreter():
    if not interpreting():
        pytest.skip("runs the kernels through the Triton interpreter on CPU")


def _inputs(N, V, D, dtype, *, ignore_frac=0.2, bias=False, seed=0, h_scale=1.0, b_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g, dtype=F64) * h_scale).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=F64) * (2.0 / D**0.5)).to(dtype)
    b = (torch.randn(V, generator=g, dtype=F64) + b_shift).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_frac] = -100
    return h, W, b, y


@pytest.fixture
def splits(monkeypatch):
    """Set the interpreter's split count (the device-free rule caps it at the number of V tiles)."""

    def set_(n):
        monkeypatch.setattr(K, "_INTERPRET_SPLITS", n)

    return set_


def _check_forward(h, W, b, y, dtype, **kw):
    """no_grad forward (the profiler's pass): logprob, entropy, lse vs the float64 oracle."""
    with torch.no_grad():
        out = token_logprobs(h, W, y, bias=b, return_entropy=True, return_lse=True, impl="triton", **kw)
    oracle = naive_token_logprobs(h, W, y, bias=b, **kw)
    base = naive_token_logprobs(h, W, y, bias=b, matmul_dtype=dtype, math_dtype=torch.float32, **kw)
    for name, a, o, bb in zip(("logprob", "entropy", "lse"), out, oracle, base):
        assert a.dtype == torch.float32
        assert_close_to_oracle(name, a, o, bb, dtype=dtype)
        assert (a[y == -100] == 0).all()
    return out


# --------------------------------------------------------------------------------------------------------------
# split grid and combine
# --------------------------------------------------------------------------------------------------------------


def test_interpreter_rule_gives_several_splits():
    _need_interpreter()
    bv = K._tile_config("fwd", torch.float32)["BLOCK_V"]
    plan = K.fwd_plan(70, 5 * bv - 3, 33, torch.float32)
    assert plan["splits"] == 3 and plan["tiles_per_split"] == 2 and plan["grid"] == 3 * 3
    assert K.fwd_plan(70, bv, 33, torch.float32)["splits"] == 1  # one V tile: one split


@pytest.mark.parametrize("n_splits", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_forward_matches_oracle_for_any_split_count(n_splits, dtype, splits, poison_empty):
    """Awkward N / V / D (no multiple of any tile), bias, softcap + temperature, ignored rows; the last split is
    shorter than the others (V = 333 is 6 tiles of 64: splits of 2, 3 or 6 tiles)."""
    splits(n_splits)
    h, W, b, y = _inputs(71, 333, 37, dtype, bias=True, seed=n_splits)
    _check_forward(h, W, b, y, dtype, softcap=6.0, temperature=0.8)


def test_splits_do_not_change_the_result_beyond_rounding(splits):
    """Every split count gives the oracle's values; the combine is deterministic (bitwise equal on a re-run)."""
    h, W, b, y = _inputs(40, 400, 24, torch.float32, bias=True, seed=3)
    outs = []
    for n in (1, 3, 7):
        splits(n)
        outs.append(_check_forward(h, W, b, y, torch.float32))
        again = token_logprobs(h, W, y, bias=b, return_entropy=True, return_lse=True, impl="triton")
        for a, r in zip(again, outs[-1]):
            torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_split_grid_skips_inactive_blocks_without_host_sync(splits, monkeypatch):
    """Active rows first: with 3/4 of the rows ignored, 3/4 of the (row block × split) programs see no active row
    and exit before any GEMM work (counted through the logits-tile helper's trip count under the interpreter)."""
    _need_interpreter()
    splits(2)
    bn = K._tile_config("fwd", torch.float32)["BLOCK_N"]
    h, W, b, y = _inputs(4 * bn, 130, 16, torch.float32, ignore_frac=0.0, seed=4)
    y[torch.randperm(4 * bn, generator=torch.Generator().manual_seed(0))[bn:]] = -100  # bn active rows, scattered
    tiles = []
    real = K._lce_logits_tile

    def counting(*a, **k):
        tiles.append(1)
        return real(*a, **k)

    monkeypatch.setattr(K, "_lce_logits_tile", counting)  # the interpreter resolves the helper at call time
    _check_forward(h, W, b, y, torch.float32)
    v_tiles = triton.cdiv(130, K._tile_config("fwd", torch.float32)["BLOCK_V"])
    assert len(tiles) == v_tiles  # one active row block, each of its V tiles once (over 2 splits)
    # the plan's FLOP count is the kernel's tile loops: tiles × d_steps dots of [BN, BD] × [BD, BV]
    plan = K.fwd_plan(4 * bn, 130, 16, torch.float32, n_active=bn)
    assert plan["splits"] == 2 and plan["grid"] == 4 * 2
    assert plan["flops"] == len(tiles) * plan["d_steps"] * 2 * bn * plan["BLOCK_V"] * plan["BLOCK_D"]


@pytest.mark.parametrize("n_splits", [1, 4])
def test_all_ignored_rows(n_splits, splits, poison_empty):
    splits(n_splits)
    h, W, b, y = _inputs(33, 300, 20, torch.float32, bias=True, ignore_frac=1.0)
    for grad in (False, True):
        hh = h.clone().requires_grad_(grad)
        out = token_logprobs(hh, W, y, bias=b, return_entropy=True, return_lse=True, impl="triton")
        for t in out:
            assert (t == 0).all()
        if grad:
            sum(t.sum() for t in out).backward()
            assert (hh.grad == 0).all()


@pytest.mark.parametrize("case", ["huge", "all-negative"])
def test_huge_and_all_negative_logits(case, splits, poison_empty):
    splits(3)
    if case == "huge":  # logits of order ±1e4
        h, W, b, y = _inputs(29, 250, 16, torch.float32, seed=8, h_scale=5e3)
    else:  # every logit around -1000
        h, W, b, y = _inputs(29, 250, 16, torch.float32, seed=8, bias=True, b_shift=-1000.0)
    lp, ent, _ = _check_forward(h, W, b, y, torch.float32)
    assert (lp <= 0).all() and (ent >= 0).all()


# --------------------------------------------------------------------------------------------------------------
# loss relative to the row max (issue 14, finding 1)
# --------------------------------------------------------------------------------------------------------------


def test_eight_equal_logits_at_2_pow_24_give_log_8(splits):
    """A common logit of 2**24: both ``lse − tgt`` of absolute fp32 values and a naive fp32 path give 2.0."""
    splits(1)
    h = torch.full((3, 1), 2.0**12)
    W = torch.full((8, 1), 2.0**12)  # z = 2**24 exactly
    y = torch.tensor([0, 5, 7])
    lp = token_logprobs(h, W, y, impl="triton").logprob
    loss = linear_cross_entropy(h, W, y, reduction="none", impl="triton", strategy="fused")
    torch.testing.assert_close(lp, torch.full((3,), -math.log(8.0)), rtol=2 * EPS32, atol=0)
    torch.testing.assert_close(loss, torch.full((3,), math.log(8.0)), rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("magnitude", [100.0, 3000.0, 16384.0, 2.0**24])
def test_loss_precision_does_not_degrade_with_logit_magnitude(magnitude, splits):
    """The issue's table: loss error vs float64 on the same (exactly represented) logits, against
    ``F.cross_entropy`` on those logits. Error budget: 2× F.cross_entropy's + a few fp32 ulps of the loss."""
    splits(3)
    g = torch.Generator().manual_seed(1)
    V, N = 200, 16
    w = (magnitude - 8.0 * torch.rand(V, 1, generator=g, dtype=F64)).float()  # logits within 8 of the magnitude
    w = w.to(F64).clamp(max=magnitude).float()
    h = torch.ones(N, 1)
    y = torch.randint(0, V, (N,), generator=g)
    z64 = (h.double() @ w.double().t())
    oracle = torch.logsumexp(z64, -1) - z64.gather(1, y[:, None])[:, 0]
    ce = torch.nn.functional.cross_entropy((h @ w.t()), y, reduction="none")
    loss = linear_cross_entropy(h, w, y, reduction="none", impl="triton", strategy="fused")
    lp = token_logprobs(h, w, y, impl="triton").logprob
    budget = 2 * (ce.double() - oracle).abs().max().item() + 4 * EPS32 * oracle.abs().max().item()
    assert (loss.double() - oracle).abs().max().item() <= budget
    assert (lp.double() + oracle).abs().max().item() <= budget


def test_gradient_of_nll_output_flows_to_lse_and_target():
    """``token_logprobs`` differentiates through the primitive's nll output: random upstream on logprob and lse."""
    h, W, b, y = _inputs(23, 150, 19, torch.float32, bias=True, seed=9)
    g = torch.Generator().manual_seed(2)
    ups = [torch.randn(23, generator=g), None, torch.randn(23, generator=g)]

    def ours(h_, W_, b_):
        out = token_logprobs(h_, W_, y, bias=b_, return_lse=True, impl="triton")
        return out.logprob, out.entropy, out.lse

    def naive(h_, W_, b_, **dt):
        return naive_token_logprobs(h_, W_, y, bias=b_, **dt)

    _, grads = grads_of(ours, (h, W, b), upstream=ups)
    _, grads_o = grads_of(naive, (h, W, b), upstream=ups)
    _, grads_b = grads_of(lambda *a: naive(*a, matmul_dtype=torch.float32, math_dtype=torch.float32), (h, W, b),
                          upstream=ups)
    for name, a, o, bb in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_o, grads_b):
        assert_close_to_oracle(name, a, o, bb, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# soft-capping precision (issue 14, finding 2)
# --------------------------------------------------------------------------------------------------------------


if triton is not None:

    @triton.jit
    def _tanh_probe(x, out, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        tl.store(out + o, K._tanh(tl.load(x + o, mask=m, other=0.0)), mask=m)


def _kernel_tanh(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    _tanh_probe[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    return out


@pytest.mark.parametrize("cap", [30.0, 5.0])
def test_softcapped_logits_as_accurate_as_torch(cap):
    """``cap · tanh(x / cap)`` in the kernels vs float64, against torch's fp32 ``cap * tanh(x / cap)``: absolute error
    and relative error (the latter is where ``1 − 2/(e^{2x}+1)`` lost 1e-3 near 0)."""
    _need_interpreter()
    x = torch.cat([torch.linspace(-300, 300, 60001), torch.logspace(-8, 1.5, 3000), -torch.logspace(-8, 1.5, 3000)])
    z64 = cap * torch.tanh(x.double() / cap)
    z_torch = cap * torch.tanh(x / cap)
    z_ours = cap * _kernel_tanh(x / cap)
    for metric in ("abs", "rel"):
        def err(z, metric=metric):
            e = (z.double() - z64).abs()
            return (e / z64.abs().clamp_min(1e-30) if metric == "rel" else e).max().item()

        assert err(z_ours) <= 2 * err(z_torch) + (EPS32 * 1e-3 if metric == "rel" else 0.0), metric


def test_softcap_gradient_precision_at_cap_30(splits):
    """Gradients through soft-capping at cap 30 (Gemma 2) against float64, budget from plain fp32 PyTorch."""
    splits(2)
    h, W, b, y = _inputs(37, 190, 29, torch.float32, bias=True, seed=11, h_scale=1.0)

    def ours(h_, W_, b_):
        return linear_cross_entropy(h_, W_, y, bias=b_, reduction="none", softcap=30.0, impl="triton",
                                    strategy="fused")

    up = [torch.randn(37, generator=torch.Generator().manual_seed(5))]
    out, grads = grads_of(ours, (h, W, b), upstream=up)
    out_o, grads_o = grads_of(lambda h_, W_, b_: naive_ce(h_, W_, y, bias=b_, reduction="none", softcap=30.0),
                              (h, W, b), upstream=up)
    out_b, grads_b = grads_of(lambda h_, W_, b_: naive_ce(h_, W_, y, bias=b_, reduction="none", softcap=30.0,
                                                          matmul_dtype=torch.float32, math_dtype=torch.float32),
                              (h, W, b), upstream=up)
    assert_close_to_oracle("loss", out[0], out_o[0], out_b[0], dtype=torch.float32)
    for name, a, o, bb in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_o, grads_b):
        assert_close_to_oracle(name, a, o, bb, dtype=torch.float32)
        rel = ((a.double() - o).norm() / o.norm()).item()
        rel_b = ((bb.double() - o).norm() / o.norm()).item()
        assert rel <= 2 * rel_b + 1e-7, (name, rel, rel_b)


# --------------------------------------------------------------------------------------------------------------
# T3S_AUTOTUNE=1: reset_to_zero must never hit a placeholder (issue 8 review)
# --------------------------------------------------------------------------------------------------------------


class _AutotunerStandIn:
    """Does what ``triton.autotune`` does with ``reset_to_zero`` (zero those arguments before each benchmark trial
    and before the final run), then launches the shipped config. The real autotuner needs a GPU to time trials."""

    def __init__(self, kind, kernel, reset_to_zero):
        self.kind, self.kernel, self.reset_to_zero = kind, kernel, list(reset_to_zero)

    def __getitem__(self, grid):
        def run(**args):
            cfg = K._tile_config(self.kind, args["h"].dtype)
            for _trial in range(3):  # two benchmark trials, then the real run
                for name in self.reset_to_zero:
                    args[name].zero_()
                self.kernel[grid(cfg)](**args, **cfg)

        return run


@pytest.mark.parametrize("bias", [False, True])
def test_autotune_reset_to_zero_does_not_clobber_lse(bias, monkeypatch):
    _need_interpreter()
    monkeypatch.setattr(K, "_fwd_tuned", _AutotunerStandIn("fwd", K._lce_stats_fwd_kernel, []))
    monkeypatch.setattr(K, "_dh_tuned", _AutotunerStandIn("dh", K._lce_bwd_dh_kernel, ["dh"]))
    monkeypatch.setattr(K, "_dw_tuned", _AutotunerStandIn("dw", K._lce_bwd_dw_kernel, ["dw", "db"]))
    h, W, b, y = _inputs(19, 90, 17, torch.float32, bias=bias, seed=12)
    kw = dict(reduction="none", strategy="fused", z_loss=1e-2)
    up = [torch.randn(19, generator=torch.Generator().manual_seed(1))]
    out, grads = grads_of(lambda *a: linear_cross_entropy(a[0], a[1], y, bias=a[2], impl="triton", **kw), (h, W, b),
                          upstream=up)
    out_o, grads_o = grads_of(lambda h_, W_, b_: naive_ce(h_, W_, y, bias=b_, **kw_naive(kw)), (h, W, b),
                              upstream=up)
    out_b, grads_b = grads_of(lambda h_, W_, b_: naive_ce(h_, W_, y, bias=b_, matmul_dtype=torch.float32,
                                                          math_dtype=torch.float32, **kw_naive(kw)),
                              (h, W, b), upstream=up)
    assert_close_to_oracle("loss", out[0], out_o[0], out_b[0], dtype=torch.float32)
    for name, a, o, bb in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_o, grads_b):
        if o is not None:
            assert_close_to_oracle(name, a, o, bb, dtype=torch.float32)


def kw_naive(kw):
    return {k: v for k, v in kw.items() if k != "strategy"}


def test_autotuned_launch_rejects_aliased_reset_arguments():
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="aliases"):
        K._check_reset_args(_AutotunerStandIn("dw", None, ["db"]), dict(db=x, lse=x[1:]))


# --------------------------------------------------------------------------------------------------------------
# the split rule on a GPU's numbers (pure arithmetic: no device needed)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 4096, 16384, 32768])
def test_split_rule_fills_the_gpu_and_keeps_h_in_l2(N):
    """H100 numbers (132 SMs, 50 MB L2), the shipped bf16 tile: enough programs for the SMs, the resident h blocks
    within half of L2, wave efficiency ≥ 90 % where there is enough work, and no empty split."""
    bn, bv = K._CONFIGS[("fwd", 2)][:2]
    V, D, sms, l2 = 151936, 4096, 132, 50 * 2**20
    s = K.fwd_splits(N, V, D, bn, bv, 2, sms, l2, K._CTAS_PER_SM[("fwd", 2)])
    v_tiles = triton.cdiv(V, bv)
    per = triton.cdiv(v_tiles, s)
    assert triton.cdiv(v_tiles, per) == s  # no empty split
    n_blocks = triton.cdiv(N, bn)
    resident_rows = min(n_blocks, max(1, sms // s)) * bn
    assert resident_rows * D * 2 <= l2 // 2
    assert n_blocks * s >= sms
    assert 5 * s * N * 4 <= max(8 * sms * bn, N * 64) * 5 * 4  # partials workspace: a few MB at most
    waves = triton.cdiv(n_blocks * s, sms)
    eff = n_blocks * v_tiles / (waves * sms * per)
    if N >= 4096:
        assert eff >= 0.9, (s, eff)


# --------------------------------------------------------------------------------------------------------------
# on a GPU (compiled kernels, the device's split rule)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_softcapped_logits_as_accurate_as_torch():
    x = torch.cat([torch.linspace(-300, 300, 600001), torch.logspace(-8, 1.5, 3000)]).cuda()
    for cap in (30.0, 5.0):
        z64 = cap * torch.tanh(x.double() / cap)
        err_ours = (cap * _kernel_tanh(x / cap) - z64).abs().max().item()
        err_torch = (cap * torch.tanh(x / cap) - z64).abs().max().item()
        assert err_ours <= 2 * err_torch, (cap, err_ours, err_torch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_forward_at_a_real_vocabulary(dtype):
    """Compiled kernel, the device's split rule (several splits at this N), V = 151936, bf16 / fp16."""
    h, W, b, y = _inputs(1024, 151936, 1024, dtype, seed=21)
    h, W, y = h.cuda(), W.cuda(), y.cuda()
    plan = K.fwd_plan(1024, 151936, 1024, dtype, h.device)
    assert plan["splits"] > 1
    _check_forward(h, W, None, y, dtype)
