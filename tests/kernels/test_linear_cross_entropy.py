"""linear_cross_entropy: Triton kernels (fused and chunked strategies) against the float64 naive oracle, with the
tolerance of ``assert_close_to_oracle`` (baseline: the same loss in plain PyTorch at the input dtype); dispatch,
edge cases and argument validation."""

from __future__ import annotations

import pytest
import torch
from _lce_oracle import check_ce_against_oracle, naive_ce

from t3s_kernels.linear_ce import function as lce_function
from t3s_kernels.linear_ce import kernels as lce_kernels
from t3s_kernels.linear_ce import linear_cross_entropy, token_logprobs

F64 = torch.float64


def _inputs(shape, V, D, dtype, *, ignore_frac=0.2, bias=False, weights=False, seed=0, h_scale=1.0, b_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, D, generator=g, dtype=F64) * h_scale).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=F64) * (2.0 / D**0.5)).to(dtype)
    b = (torch.randn(V, generator=g, dtype=F64) + b_shift).to(dtype) if bias else None
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    w = None
    if weights:
        w = torch.rand(shape, generator=g)
        w[torch.rand(shape, generator=g) < 0.3] = 0.0
    return h, W, b, y, w


def _check_against_oracle(h, W, b, y, dtype, *, upstream=None, **kw):
    """Triton output and gradients vs float64 oracle, budget from the same-dtype PyTorch baseline."""
    def ours(h_, W_, b_):
        return linear_cross_entropy(h_, W_, y, bias=b_, impl="triton", **kw)

    kw_naive = {k: v for k, v in kw.items() if k != "strategy"}
    return check_ce_against_oracle(ours, h, W, b, y, dtype, upstream=upstream, **kw_naive)


SHAPES = [
    pytest.param((1,), 37, 19, dict(bias=True), dict(), id="N1-V37-D19-bias"),
    pytest.param((37,), 111, 45, dict(), dict(softcap=5.0, temperature=0.7), id="N37-V111-D45-softcap-temp"),
    pytest.param((129,), 300, 70, dict(bias=True), dict(label_smoothing=0.1, z_loss=1e-3),
                 id="N129-V300-D70-smoothing-zloss"),
]


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["fused", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,V,D,inp,kw", SHAPES)
def test_triton_ce_matches_oracle(shape, V, D, inp, kw, dtype, strategy, poison_empty):
    h, W, b, y, _ = _inputs(shape, V, D, dtype, **inp)
    _check_against_oracle(h, W, b, y, dtype, strategy=strategy, **kw)


@pytest.mark.triton
@pytest.mark.parametrize("fused_backward", ["kernel", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_reduction_none_random_grad_output(dtype, fused_backward, monkeypatch, small_chunks, poison_empty):
    monkeypatch.setenv("T3S_FUSED_BACKWARD", fused_backward)
    h, W, b, y, w = _inputs((4, 13), 67, 21, dtype, bias=True, weights=True, seed=5)
    up = [torch.randn(y.shape, generator=torch.Generator().manual_seed(9))]
    _check_against_oracle(h, W, b, y, dtype, upstream=up, reduction="none", token_weight=w, label_smoothing=0.1,
                          z_loss=1e-2, softcap=3.0)


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["fused", "chunked"])
def test_triton_shift_weights_normalizer(strategy, poison_empty):
    h, W, b, y, w = _inputs((2, 17), 53, 24, torch.float32, bias=True, weights=True, seed=6)
    h = h.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous view of hidden
    _check_against_oracle(h, W, b, y, torch.float32, shift=True, token_weight=w,
                          normalizer=torch.tensor(21.0), strategy=strategy)


@pytest.mark.triton
def test_triton_return_lse_differentiable(poison_empty):
    h, W, b, y, _ = _inputs((3, 11), 41, 17, torch.float32, bias=True, seed=7)
    g = torch.Generator().manual_seed(3)
    up = [torch.randn((), generator=g), torch.randn(3, 11, generator=g)]
    _check_against_oracle(h, W, b, y, torch.float32, upstream=up, return_lse=True, z_loss=1e-3, strategy="fused")


@pytest.mark.triton
@pytest.mark.parametrize("case", ["huge", "all-negative"])
def test_triton_extreme_logits(case, poison_empty):
    if case == "huge":  # logits of order ±1e4
        h, W, b, y, _ = _inputs((23,), 57, 16, torch.float32, seed=8, h_scale=5e3)
    else:  # every logit around -1000
        h, W, b, y, _ = _inputs((23,), 57, 16, torch.float32, seed=8, bias=True, b_shift=-1000.0)
    (loss,), _ = _check_against_oracle(h, W, b, y, torch.float32, strategy="fused", reduction="none")
    assert (loss >= 0).all()
    _check_against_oracle(h, W, b, y, torch.float32, strategy="chunked", reduction="sum", label_smoothing=0.1)


@pytest.mark.triton
@pytest.mark.parametrize("impl,strategy", [("reference", "auto"), ("triton", "fused"), ("triton", "chunked")])
@pytest.mark.parametrize("how", ["ignore", "zero-weight"])
def test_all_ignored_gives_zero_loss_and_zero_grads(impl, strategy, how, poison_empty):
    h, W, b, y, _ = _inputs((2, 9), 29, 12, torch.float32, bias=True, ignore_frac=1.0 if how == "ignore" else 0.0)
    w = torch.zeros(y.shape) if how == "zero-weight" else None
    for reduction in ("mean", "sum", "none"):
        hh, WW, bb = (t.clone().requires_grad_() for t in (h, W, b))
        loss, lse = linear_cross_entropy(hh, WW, y, bias=bb, token_weight=w, reduction=reduction, impl=impl,
                                         strategy=strategy, return_lse=True, label_smoothing=0.1, z_loss=1e-3)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and (loss == 0).all()
        assert (lse == 0).all()
        for t in (hh, WW, bb):
            assert torch.isfinite(t.grad).all() and (t.grad == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["fused", "chunked"])
def test_triton_bf16_and_larger_vocab(strategy, poison_empty):
    """bf16 (operands upcast under the interpreter) at a shape with one tile per axis; V = 5003 (79 vocabulary
    tiles of the online softmax) in fp32."""
    h, W, b, y, _ = _inputs((19,), 83, 24, torch.bfloat16, bias=True, seed=13)
    _check_against_oracle(h, W, b, y, torch.bfloat16, strategy=strategy, label_smoothing=0.1)
    h, W, b, y, _ = _inputs((5,), 5003, 16, torch.float32, bias=True, seed=14, ignore_frac=0.0)
    _check_against_oracle(h, W, b, y, torch.float32, strategy=strategy, z_loss=1e-3)


def _rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _oracle_dw(h_c, W_c, y, **kw):
    """fp64 ``dW`` of the loss at the compute-dtype values ``h_c`` / ``W_c`` (what the GEMMs read)."""
    W64 = W_c.double().requires_grad_()
    naive_ce(h_c.double(), W64, y, **kw).backward()
    return W64.grad


@pytest.mark.triton
@pytest.mark.parametrize("impl,strategy", [("reference", "auto"), ("triton", "fused"), ("triton", "chunked"),
                                           ("auto", "auto")])
@pytest.mark.parametrize("entry", ["autocast", "compute_dtype"])
def test_fp32_master_weights_get_exact_fp32_gradients(impl, strategy, entry):
    """The dW contract, fp32 master weights under a bf16 compute (autocast or ``compute_dtype``): the logits read
    bf16-rounded operands (the loss and dh equal a bf16-input call's), but ``dW`` is the fp32 sum — values bf16
    cannot represent, matching the fp64 oracle to fp32 accumulation error (bf16 rounding would be ~1e-3)."""
    h, W, _, y, _ = _inputs((2, 7), 37, 16, torch.float32, seed=15)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    if entry == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hh, WW, y, impl=impl, strategy=strategy)
    else:
        loss = linear_cross_entropy(hh, WW, y, impl=impl, strategy=strategy, compute_dtype=torch.bfloat16)
    loss.backward()
    assert loss.dtype == torch.float32 and hh.grad.dtype == torch.float32 and WW.grad.dtype == torch.float32
    hb, Wb = h.bfloat16().requires_grad_(), W.bfloat16().requires_grad_()
    ref = linear_cross_entropy(hb, Wb, y, impl=impl, strategy=strategy)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(hh.grad, hb.grad.float(), rtol=0, atol=0)
    assert (WW.grad != WW.grad.bfloat16().float()).float().mean() > 0.9  # not bf16 values
    oracle = _oracle_dw(h.bfloat16(), W.bfloat16(), y)
    assert _rel_fro(WW.grad, oracle) < 1e-5, _rel_fro(WW.grad, oracle)  # fp32 accumulation: ~1e-7
    assert _rel_fro(Wb.grad, oracle) > 1e-4  # the bf16 gradient is measurably coarser: the check can fail


def test_compute_dtype_arguments():
    h, W, _, y, _ = _inputs((5,), 11, 8, torch.float32)
    with pytest.raises(TypeError, match="compute_dtype"):
        linear_cross_entropy(h, W, y, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="master"):
        linear_cross_entropy(h.bfloat16(), W, y)  # mixed dtypes need compute_dtype
    with pytest.raises(TypeError, match="compute_dtype"):
        linear_cross_entropy(h, W.half(), y, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("mode,bound", [("weight_dtype", 1.5e-2), ("fp32", 6e-3)])
def test_half_weight_gradient_accumulation_modes(mode, bound):
    """bf16 weights: the default accumulates dW in bf16 per super-chunk (here 8 super-chunks through a small
    workspace), the opt-in in fp32; both against the fp64 oracle within their documented bounds (the fp32 mode's
    only error is the final rounding to bf16, ≤ 2^-9 per element), and the fp32 mode is closer."""
    h, W, _, y, _ = _inputs((256,), 64, 32, torch.bfloat16, seed=21, ignore_frac=0.0)
    oracle = _oracle_dw(h, W, y, reduction="sum")
    errs = {}
    for m in ("weight_dtype", "fp32"):
        WW = W.clone().requires_grad_()
        linear_cross_entropy(h, WW, y, reduction="sum", weight_grad_accumulation=m,
                             workspace_bytes=32 * 64 * 4).backward()
        assert WW.grad.dtype == torch.bfloat16
        errs[m] = _rel_fro(WW.grad, oracle)
    assert errs[mode] < bound, errs
    assert errs["fp32"] <= errs["weight_dtype"], errs


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["fused", "chunked"])
def test_ignored_rows_do_not_leak(strategy, poison_empty):
    """NaN hidden states at ignored / zero-weight rows change nothing: every path skips those rows (the fused
    kernels by their row order, the chunked path by compacting the active rows), never multiplying them by zero.
    int32 targets."""
    h, W, b, y, w = _inputs((40,), 47, 18, torch.float32, bias=True, weights=True, seed=12)
    dead = (y == -100) | (w == 0)
    y = y.to(torch.int32)
    results = []
    for fill in (0.0, float("nan")):
        hh = h.clone()
        hh[dead] = fill
        hh.requires_grad_()
        WW, bb = W.clone().requires_grad_(), b.clone().requires_grad_()
        loss = linear_cross_entropy(hh, WW, y, bias=bb, token_weight=w, impl="triton", strategy=strategy)
        loss.backward()
        results.append((loss, hh.grad, WW.grad, bb.grad))
    for a, r in zip(results[1], results[0]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=0, atol=0)


@pytest.mark.triton
def test_strategy_dispatch(monkeypatch):
    """auto: the cost rule (``dispatch.FUSED_MAX_FLOPS``) picks the chunked path for every reduction above it —
    weighted, ``none``, ``return_lse`` alike (behaviour changed: it used to depend on which argument was passed) —
    and the fused kernels for calls at or below it; forward-only without grad, where ``forward_uses_sweep`` picks the fused
    forward kernel for tiny calls and the statistics sweep above its threshold. impl="auto" on CPU is the chunked
    path."""
    from t3s_kernels.linear_ce import chunked as lce_chunked
    from t3s_kernels.linear_ce import dispatch as lce_api

    h, W, _, y, w = _inputs((9,), 31, 16, torch.float32, weights=True)
    calls = []
    real_ce, real_stats = lce_function.ChunkedCEFunction.apply, lce_function.ChunkedStatsFunction.apply
    real_apply, real_fwd = lce_function.LinearTokenStatsFunction.apply, lce_kernels.lce_stats_fwd
    monkeypatch.setattr(lce_function.ChunkedCEFunction, "apply",
                        lambda *a, **k: calls.append("chunked") or real_ce(*a, **k))
    monkeypatch.setattr(lce_function.ChunkedStatsFunction, "apply",
                        lambda *a, **k: calls.append("chunked-stats") or real_stats(*a, **k))
    monkeypatch.setattr(lce_function.LinearTokenStatsFunction, "apply",
                        lambda *a, **k: calls.append("fused") or real_apply(*a, **k))
    monkeypatch.setattr(lce_kernels, "lce_stats_fwd", lambda *a, **k: calls.append("fwd") or real_fwd(*a, **k))
    real_sweep = lce_chunked.stats_only
    monkeypatch.setattr(lce_chunked, "stats_only", lambda *a, **k: calls.append("sweep") or real_sweep(*a, **k))
    hg = h.clone().requires_grad_()

    def run(*, expect, impl="triton", **kw):
        calls.clear()
        linear_cross_entropy(hg if kw.pop("grad", True) else h, W, y, impl=impl, **kw)
        assert calls[0] == expect, (kw, calls)

    flops = 2 * 9 * 16 * 31
    monkeypatch.setattr(lce_api, "FUSED_MAX_FLOPS", flops - 1)  # this call is above the rule's threshold
    run(expect="chunked")
    run(expect="chunked", reduction="sum")
    run(expect="chunked", token_weight=w)
    run(expect="chunked", token_weight=w, normalizer=torch.tensor(4.0))
    run(expect="chunked-stats", return_lse=True)
    run(expect="chunked-stats", reduction="none", token_weight=w)
    run(expect="fused", strategy="fused")
    rows = torch.nonzero((y != -100) & (w != 0)).reshape(-1)
    assert 0 < rows.numel() < 9
    run(expect="fused", token_weight=w, active_rows=rows)  # a handed-over count below the threshold -> fused
    run(expect="chunked", impl="auto")
    run(expect="chunked-stats", impl="auto", reduction="none")
    monkeypatch.setattr(lce_api, "FUSED_MAX_FLOPS", flops)
    run(expect="fused", token_weight=w)
    run(expect="chunked", token_weight=w, strategy="chunked")
    run(expect="fwd", grad=False)  # nothing requires grad: a forward-only pass, no autograd Function
    assert calls == ["fwd"]
    with torch.no_grad():
        run(expect="fwd")
        assert calls == ["fwd"]
        run(expect="sweep", strategy="chunked")
        monkeypatch.setattr(lce_api, "FORWARD_SWEEP_MIN_FLOPS", flops - 1)  # above the forward rule's threshold
        run(expect="sweep")
        run(expect="fwd", strategy="fused")
        assert token_logprobs(h, W, y, impl="triton").logprob.shape == y.shape and calls[-1] == "sweep"
    monkeypatch.undo()
    assert lce_api.forward_uses_sweep("auto", 32768, 4096, 151936)  # every LLM-sized scoring call: the sweep
    assert not lce_api.forward_uses_sweep("auto", 8, 4096, 151936)  # a few rows: the fused kernel


@pytest.mark.triton
def test_no_grad_forward_saves_nothing():
    h, W, b, y, _ = _inputs((21,), 113, 9, torch.float32, bias=True)
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    packed = []

    def pack(t):
        packed.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            loss = linear_cross_entropy(hg, Wg, y, bias=b, impl="triton", reduction="none")
        assert not loss.requires_grad and packed == []
        # with grad: the fused strategy saves inputs and O(N) vectors, never an [N, V] block
        linear_cross_entropy(hg, Wg, y, bias=b, impl="triton", strategy="fused")
    assert packed and max(packed) < 21 * 113


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_chunked_small_workspace_many_chunks(dtype, small_chunks, poison_empty):
    """Several chunks (workspace budget of 7 rows) give the same result as the oracle; int32 targets."""
    h, W, b, y, _ = _inputs((45,), 64, 20, dtype, bias=True, seed=11)
    y = y.to(torch.int32)
    _check_against_oracle(h, W, b, y, dtype, strategy="chunked", label_smoothing=0.2, softcap=4.0, z_loss=1e-3)


@pytest.mark.triton
def test_shipped_configs_compile_for_sm90_without_spills():
    """The interpreter cannot see compiler-only errors or register spills: compile every kernel for sm_90 with its
    shipped config (no GPU needed) in a subprocess without TRITON_INTERPRET."""
    from _aot_compile import has_ptxas, run_subprocess

    if not has_ptxas():
        pytest.skip("triton's bundled ptxas is not available")
    from _aot_compile import parse_report

    r = run_subprocess("lce", "bf16", "fp32")
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    rows = parse_report(r.stdout)
    print(r.stdout)  # the register / shared-memory / occupancy table (pytest -s shows it)
    assert rows and all(row["STACK"] == 0 for row in rows), r.stdout
    for variant, width in (("bf16", 2), ("fp32", 4)):
        names = {row["name"] for row in rows if row["variant"] == variant}
        assert {"_lce_stats_fwd_kernel", "_lce_bwd_dh_kernel", "_lce_bwd_dw_kernel"} <= names, r.stdout
        assert len(names) >= 4, r.stdout  # and the chunked strategy's kernels
        fwd = [row for row in rows if row["variant"] == variant and row["name"] == "_lce_stats_fwd_kernel"]
        # the split rule sizes its waves with this occupancy
        assert {row["CTAS/SM"] for row in fwd} == {lce_kernels._CTAS_PER_SM[("fwd", width)]}, r.stdout


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------

_H, _W, _B, _Y, _ = _inputs((2, 5), 11, 8, torch.float32, bias=True)

BAD = [
    pytest.param(dict(hidden=_H[..., :7]), ValueError, "weight.shape\\[1\\]", id="D-mismatch"),
    pytest.param(dict(weight=_W[0]), ValueError, "weight must be 2-D", id="weight-1d"),
    pytest.param(dict(weight=_W.double()), TypeError, "weight dtype", id="mixed-dtype"),
    pytest.param(dict(targets=_Y.float()), TypeError, "targets must be an integer", id="float-targets"),
    pytest.param(dict(targets=_Y[:, :4]), ValueError, "targets must have shape", id="targets-shape"),
    pytest.param(dict(targets=torch.full_like(_Y, 11)), ValueError, "targets must be in \\[0, V=11\\)", id="tgt>=V"),
    pytest.param(dict(targets=torch.full_like(_Y, -3)), ValueError, "targets must be in", id="tgt<0"),
    pytest.param(dict(bias=_B[:5]), ValueError, "bias must have shape", id="bias-shape"),
    pytest.param(dict(token_weight=torch.ones(2, 4)), ValueError, "token_weight must have the shape", id="tw-shape"),
    pytest.param(dict(token_weight=torch.ones(2, 5, dtype=torch.long)), TypeError, "token_weight must be a float",
                 id="tw-dtype"),
    pytest.param(dict(token_weight=torch.full((2, 5), float("nan"))), ValueError, "token_weight must be finite",
                 id="tw-nan"),
    pytest.param(dict(reduction="avg"), ValueError, "reduction must be one of", id="reduction"),
    pytest.param(dict(impl="cuda"), ValueError, "impl must be one of", id="impl"),
    pytest.param(dict(strategy="fast"), ValueError, "strategy must be one of", id="strategy"),
    pytest.param(dict(label_smoothing=1.0), ValueError, "label_smoothing", id="smoothing"),
    pytest.param(dict(temperature=0.0), ValueError, "temperature", id="temperature"),
    pytest.param(dict(softcap=-1.0), ValueError, "softcap", id="softcap"),
    pytest.param(dict(normalizer=3.0, reduction="sum"), ValueError, "normalizer", id="normalizer-sum"),
    pytest.param(dict(z_loss=-1.0), ValueError, "z_loss", id="z_loss"),
]


@pytest.mark.parametrize("override,exc,match", BAD)
def test_bad_arguments_raise_clear_errors(override, exc, match):
    args = dict(hidden=_H, weight=_W, targets=_Y, bias=_B)
    args.update(override)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=match):
        linear_cross_entropy(hidden, weight, targets, **args)
