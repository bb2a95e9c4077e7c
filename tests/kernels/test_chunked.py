"""The GEMM-bound chunked path (t3s_kernels/linear_ce/chunked.py) on both of its row routines — torch ops
(``impl="auto"`` on CPU) and the Triton row kernel (``impl="triton", strategy="chunked"`` under the interpreter) —
against the float64 oracle (tolerance: ``assert_close_to_oracle``, baseline = plain PyTorch at the input dtype);
compaction of active rows, the ``active_rows`` keyword, numerics at huge logits, bounded workspace, traced FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from _lce_oracle import check_ce_against_oracle, grads_of, naive_token_logprobs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from t3s_kernels.linear_ce import linear_cross_entropy, token_logprobs
from t3s_kernels.testing import assert_close_to_oracle

F64 = torch.float64
PATHS = [
    pytest.param(dict(impl="auto"), id="torch-rows"),
    pytest.param(dict(impl="triton", strategy="chunked"), id="triton-rows", marks=pytest.mark.triton),
]


def _inputs(N, V, D, dtype, *, ignore_frac=0.2, bias=True, weights=False, seed=0, h_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g, dtype=F64) * h_scale).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=F64) * (2.0 / D**0.5)).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_frac] = -100
    w = None
    if weights:  # half of the rows get weight 0
        w = torch.rand(N, generator=g) + 0.5
        w[torch.rand(N, generator=g) < 0.5] = 0.0
    return h, W, b, y, w


def _ce_check(h, W, b, y, dtype, path, *, upstream=None, **kw):
    def ours(h_, W_, b_):
        return linear_cross_entropy(h_, W_, y, bias=b_, **path, **kw)

    return check_ce_against_oracle(ours, h, W, b, y, dtype, upstream=upstream, **kw)


OPTIONS = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(label_smoothing=0.1, z_loss=1e-2), id="smoothing-zloss"),
    pytest.param(dict(softcap=3.0, temperature=0.7), id="softcap-temp"),
    pytest.param(dict(label_smoothing=0.2, z_loss=1e-3, softcap=5.0, temperature=1.3), id="all"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_matches_oracle(reduction, opts, dtype, path, small_chunks, poison_empty):
    h, W, b, y, w = _inputs(41, 67, 19, dtype, weights=True, seed=1)
    up = None
    if reduction == "none":  # an arbitrary per-token upstream gradient
        up = [torch.randn(41, generator=torch.Generator().manual_seed(2))]
    _ce_check(h, W, b, y, dtype, path, upstream=up, token_weight=w, reduction=reduction, **opts)


@pytest.mark.parametrize("path", PATHS)
def test_normalizer_shift_return_lse(path, small_chunks, poison_empty):
    g = torch.Generator().manual_seed(3)
    h, W, b, y, w = _inputs(2 * 13, 53, 24, torch.float32, weights=True, seed=4)
    h, y, w = h.reshape(2, 13, 24), y.reshape(2, 13), w.reshape(2, 13)
    _ce_check(h, W, b, y, torch.float32, path, shift=True, token_weight=w, normalizer=torch.tensor(9.0), z_loss=1e-3)
    up = [torch.randn((), generator=g), torch.randn(2, 12, generator=g)]  # the LSE gets its own gradient
    _ce_check(h, W, b, y, torch.float32, path, upstream=up, shift=True, token_weight=w, return_lse=True,
              label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_token_logprobs_grads_match_oracle(dtype, path, small_chunks, poison_empty):
    h, W, b, y, _ = _inputs(29, 71, 20, dtype, seed=5)
    kw = dict(softcap=4.0, temperature=0.9)

    def ours(h_, W_, b_):
        return tuple(token_logprobs(h_, W_, y, bias=b_, return_entropy=True, return_lse=True, **path, **kw))

    def naive(h_, W_, b_, **dt):
        return naive_token_logprobs(h_, W_, y, bias=b_, **kw, **dt)

    g = torch.Generator().manual_seed(6)
    up = [torch.randn(29, generator=g) for _ in range(3)]
    out, grads = grads_of(ours, (h, W, b), upstream=up)
    out_o, grads_o = grads_of(naive, (h, W, b), upstream=up)
    out_b, grads_b = grads_of(lambda *a: naive(*a, matmul_dtype=dtype, math_dtype=torch.float32), (h, W, b),
                              upstream=up)
    for name, a, o, bb in zip(("logprob", "entropy", "lse", "dh", "dW", "db"), out + tuple(grads),
                              out_o + tuple(grads_o), out_b + tuple(grads_b)):
        assert_close_to_oracle(name, a, o, bb, dtype=dtype)


@pytest.mark.parametrize("path", PATHS)
def test_no_grad_scoring_matches_oracle(path, small_chunks, poison_empty):
    h, W, b, y, _ = _inputs(33, 90, 16, torch.float32, seed=7)
    with torch.no_grad():
        out = token_logprobs(h, W, y, bias=b, return_entropy=True, return_lse=True, impl=path["impl"])
    ref = naive_token_logprobs(h, W, y, bias=b)
    base = naive_token_logprobs(h, W, y, bias=b, matmul_dtype=torch.float32, math_dtype=torch.float32)
    for name, a, o, bb in zip(("logprob", "entropy", "lse"), out, ref, base):
        assert_close_to_oracle(name, a, o, bb, dtype=torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how", ["ignore", "zero-weight"])
def test_all_ignored_gives_exact_zeros(how, path, poison_empty):
    h, W, b, y, _ = _inputs(11, 29, 12, torch.float32, ignore_frac=1.0 if how == "ignore" else 0.0)
    w = torch.zeros(11) if how == "zero-weight" else None
    for reduction in ("mean", "sum", "none"):
        for return_lse in (False, True):
            hh, WW, bb = (t.clone().requires_grad_() for t in (h, W, b))
            out = linear_cross_entropy(hh, WW, y, bias=bb, token_weight=w, reduction=reduction,
                                       return_lse=return_lse, label_smoothing=0.1, z_loss=1e-3, **path)
            loss = out[0] if return_lse else out
            loss.sum().backward()
            assert (loss == 0).all()
            for t in (hh, WW, bb):
                assert torch.isfinite(t.grad).all() and (t.grad == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_at_ignored_rows_does_not_leak(reduction, path, small_chunks):
    """Ignored / zero-weight rows are compacted away: NaN / Inf there changes nothing, not even through 0·NaN."""
    h, W, b, y, w = _inputs(40, 47, 18, torch.float32, weights=True, seed=8)
    dead = (y == -100) | (w == 0)
    up = torch.randn(40, generator=torch.Generator().manual_seed(9))
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        hh = h.clone()
        hh[dead] = fill
        hh.requires_grad_()
        WW, bb = W.clone().requires_grad_(), b.clone().requires_grad_()
        loss = linear_cross_entropy(hh, WW, y.to(torch.int32), bias=bb, token_weight=w, reduction=reduction, **path)
        (loss * up).sum().backward() if reduction == "none" else loss.backward()
        results.append((loss.detach(), hh.grad, WW.grad, bb.grad))
    for other in results[1:]:
        for a, r in zip(other, results[0]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, r, rtol=0, atol=0)
    assert (results[0][1][dead] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_active_rows_keyword_equals_no_keyword(reduction, path, small_chunks):
    h, W, b, y, w = _inputs(36, 41, 16, torch.float32, weights=True, seed=10)
    h3, y3, w3 = h.reshape(3, 12, 16), y.reshape(3, 12), w.reshape(3, 12)
    # with shift=True row (b, t) is scored by targets[b, t + 1]
    scored = torch.zeros(3, 12, dtype=torch.bool)
    scored[:, :-1] = (y3[:, 1:] != -100) & (w3[:, 1:] != 0)
    rows = torch.nonzero(scored.reshape(-1)).reshape(-1)
    res = []
    for kw in (dict(), dict(active_rows=rows), dict(active_rows=rows.flip(0))):
        hh, WW = h3.clone().requires_grad_(), W.clone().requires_grad_()
        loss = linear_cross_entropy(hh, WW, y3, token_weight=w3, shift=True, reduction=reduction, **path, **kw)
        loss.sum().backward()
        res.append((loss.detach(), hh.grad, WW.grad))
    for a, r in zip(res[1], res[0]):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    for a, r in zip(res[2], res[0]):  # another order: the same rows, summed in another order
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_active_rows_validation():
    h, W, b, y, w = _inputs(10, 13, 8, torch.float32, weights=True, seed=11)
    hh = h.clone().requires_grad_()
    rows = torch.nonzero((y != -100) & (w != 0)).reshape(-1)
    bad = [rows[:-1], torch.cat([rows, rows[:1]]), torch.cat([rows[:-1], rows[:1]])]
    for r in bad:
        with pytest.raises(ValueError, match="active_rows"):
            linear_cross_entropy(hh, W, y, token_weight=w, active_rows=r)
    with pytest.raises(ValueError, match="active_rows must be a 1-D int64"):
        linear_cross_entropy(hh, W, y, token_weight=w, active_rows=rows.int())
    with pytest.raises(TypeError, match="active_rows"):
        linear_cross_entropy(hh, W, y, token_weight=w, active_rows=[0, 1])
    with pytest.raises(ValueError, match="workspace_bytes"):
        linear_cross_entropy(hh, W, y, workspace_bytes=0)
    with pytest.raises(ValueError, match="weight_grad_accumulation"):
        linear_cross_entropy(hh, W, y, weight_grad_accumulation="bf16")


@pytest.mark.parametrize("path", [*PATHS, pytest.param(dict(impl="triton", strategy="fused"), id="triton-fused",
                                                        marks=pytest.mark.triton)])
def test_huge_equal_logits_keep_precision(path):
    """Eight equal logits at 2^24: the loss is log 8 (formed relative to the row max), not lse − tgt = 2.0, and
    the gradients use p = 1/8 exactly (p formed relative to the row max in every backward, the fused recompute
    included: e^{z − lse} with an fp32 lse at 2^24 gives p ≈ 0.135 and Σp ≈ 1.08)."""
    h = torch.full((3, 1), 2.0**24)
    W = torch.ones(8, 1)
    y = torch.tensor([0, 5, 7])
    onehot = torch.nn.functional.one_hot(y, 8).double()
    for reduction in ("mean", "none"):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = linear_cross_entropy(hh, WW, y, reduction=reduction, **path)
        torch.testing.assert_close(loss, torch.full_like(loss, math.log(8)), rtol=0, atol=1e-6)
        loss.sum().backward()
        scale = 1.0 / 3 if reduction == "mean" else 1.0
        # dh = Σ_v (p_v − [v = y]) W_v = Σ p − 1 = 0; dW_v = Σ_i (p_v − [v = y_i]) h_i
        torch.testing.assert_close(hh.grad, torch.zeros_like(hh.grad), rtol=0, atol=1e-6)
        expect_dw = (((1.0 / 8 - onehot) * 2.0**24).sum(0) * scale).reshape(8, 1)
        torch.testing.assert_close(WW.grad.double(), expect_dw, rtol=1e-6, atol=1.0)
    hh = h.clone().requires_grad_()
    lp_g = token_logprobs(hh, W, y, return_entropy=True, **path)
    checked = [lp_g.logprob]
    if path["impl"] == "auto":  # without grad the Triton backend runs the fused forward kernel, not this path
        with torch.no_grad():
            checked.append(token_logprobs(h, W, y, impl="auto").logprob)
    for t in checked:
        torch.testing.assert_close(t, torch.full_like(t, -math.log(8)), rtol=0, atol=1e-6)
    torch.testing.assert_close(lp_g.entropy, torch.full((3,), math.log(8)), rtol=0, atol=1e-6)


def test_weight_dtype_accumulation_and_single_backward():
    h, W, b, y, w = _inputs(30, 37, 16, torch.float32, weights=True, seed=12)
    ref = _ce_check(h, W, b, y, torch.float32, dict(impl="auto"), token_weight=w)[1]
    got = grads_of(lambda h_, W_, b_: linear_cross_entropy(h_, W_, y, bias=b_, token_weight=w,
                                                            weight_grad_accumulation="weight_dtype"), (h, W, b))[1]
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)  # fp32 weights: the accumulator is the output either way
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, W, y, token_weight=w)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


# ----------------------------------------------------------------------------------------------------------------
# construction: bounded workspace and traced GEMM FLOPs
# ----------------------------------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (every allocation of the call passes through an op)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("case", ["mean-weighted", "none", "logprobs-grad", "logprobs-no-grad"])
def test_workspace_is_bounded(case):
    """N·V = 6.9 MB of fp32 logits, workspace budget 256 KiB: no tensor of the call (forward + backward) is larger
    than the budget, whatever the reduction."""
    N, V, D = 600, 2900, 8
    budget = 256 * 1024
    h, W, b, y, w = _inputs(N, V, D, torch.float32, weights=case == "mean-weighted", seed=13)
    hh, WW, bb = (t.clone().requires_grad_() for t in (h, W, b))
    mode = _LargestTensor()
    with mode:
        if case == "mean-weighted":
            linear_cross_entropy(hh, WW, y, bias=bb, token_weight=w, label_smoothing=0.1,
                                 workspace_bytes=budget).backward()
        elif case == "none":
            loss = linear_cross_entropy(hh, WW, y, bias=bb, reduction="none", z_loss=1e-3, workspace_bytes=budget)
            loss.sum().backward()
        elif case == "logprobs-grad":
            out = token_logprobs(hh, WW, y, bias=bb, return_entropy=True, workspace_bytes=budget)
            (out.logprob.sum() + out.entropy.sum()).backward()
        else:
            with torch.no_grad():
                token_logprobs(h, W, y, bias=b, return_entropy=True, workspace_bytes=budget)
    assert 0 < mode.largest <= budget, mode.largest
    assert 20 * budget < N * V * 4


def _gemm_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("n_active", [64, 32])
def test_traced_gemm_flops(n_active):
    """A weighted mean issues 6·n·D·V GEMM FLOPs over the n active rows (half the rows at weight 0 halve them);
    reduction="none" 8·n·D·V (statistics forward + recompute backward); scoring without grad 2·n·D·V."""
    N, V, D = 64, 500, 32
    h, W, _, y, _ = _inputs(N, V, D, torch.float32, ignore_frac=0.0, bias=False, seed=14)
    w = torch.zeros(N)
    w[torch.randperm(N, generator=torch.Generator().manual_seed(1))[:n_active]] = 1.0
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    unit = n_active * D * V
    assert _gemm_flops(lambda: linear_cross_entropy(hh, WW, y, token_weight=w).backward()) == 6 * unit
    assert _gemm_flops(
        lambda: linear_cross_entropy(hh, WW, y, token_weight=w, reduction="none").sum().backward()
    ) == 8 * unit
    with torch.no_grad():
        yy = torch.where(w > 0, y, -100)
        assert _gemm_flops(lambda: token_logprobs(h, W, yy)) == 2 * unit


class _RowCopies(TorchDispatchMode):
    """Records every tensor an op produces that holds ``>= n_rows`` rows of width ``D`` (an ``[N, D]`` copy)."""

    def __init__(self, n_rows: int, D: int):
        super().__init__()
        self.n_rows, self.D, self.copies = n_rows, D, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.D and t.numel() >= self.n_rows * self.D:
                self.copies.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("call", ["mean", "none", "logprobs-no-grad"])
@pytest.mark.parametrize("cut", ["drop-last", "first-L"])
def test_strided_hidden_is_never_copied(call, cut, monkeypatch):
    """``hidden[:, :-1]`` (the profiler's shift) and ``hidden[:, :L]`` (the dLLM's x_t half) are not viewable as
    ``[N, D]``: the chunked sweep gathers their rows per chunk, so no op makes an ``[N, D]``-sized tensor (here
    ``W`` alone needs a gradient, so no ``dh`` either; a small workspace keeps each chunk's gathered rows below
    N); values equal the contiguous call's. With the old
    ``reshape`` the same tracker sees the copy (the check can fail)."""
    from t3s_kernels.linear_ce import dispatch

    B, T, D, V = 4, 66, 16, 37
    g = torch.Generator().manual_seed(3)
    full = torch.randn(B, T, D, generator=g)
    h = full[:, :-1] if cut == "drop-last" else full[:, : T // 2]
    y = torch.randint(0, V, h.shape[:-1], generator=g)
    W = torch.randn(V, D, generator=g)
    n_rows = h.shape[0] * h.shape[1]

    def run(hidden):
        WW = W.clone().requires_grad_()
        if call == "logprobs-no-grad":
            with torch.no_grad():
                return token_logprobs(hidden, WW, y, return_entropy=True, workspace_bytes=24 * V * 4).logprob, None
        loss = linear_cross_entropy(hidden, WW, y, reduction=call, workspace_bytes=24 * V * 4)
        loss.sum().backward()
        return loss, WW.grad

    with _RowCopies(n_rows, D) as mode:
        got = run(h)
    assert mode.copies == [], mode.copies
    want = run(h.contiguous())
    for a, b in zip(got, want):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(dispatch, "rows_view", lambda t: t.reshape(-1, t.shape[-1]))
    with _RowCopies(n_rows, D) as mode:
        run(h)
    assert mode.copies, "the tracker must see reshape's copy"


class _InPlaceMuls(TorchDispatchMode):
    """Records the shapes of in-place multiplications (``mul_``)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mul_.Tensor, torch.ops.aten.mul_.Scalar):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_no_weight_gradient_pass_when_the_upstream_gradient_is_one():
    """The gradient-in-forward path scales its stored gradients by ``grad_output`` in the backward: skipped when it
    is 1 (``loss.backward()``), applied otherwise (``(2·loss).backward()`` doubles every gradient)."""
    h, W, b, y, w = _inputs(30, 37, 16, torch.float32, weights=True, seed=13)
    grads = []
    for factor in (1.0, 2.0):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = linear_cross_entropy(hh, WW, y, token_weight=w)
        with _InPlaceMuls() as mode:
            (loss * factor if factor != 1.0 else loss).backward()
        assert (tuple(W.shape) in mode.shapes) == (factor != 1.0), mode.shapes
        grads.append((hh.grad, WW.grad))
    for one, two in zip(*grads):
        torch.testing.assert_close(two, 2 * one, rtol=0, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_unless_one_kernel(dtype):
    """The device-side conditional scale: 1 leaves every element untouched, 3 scales all of them, the ragged last
    block included."""
    from t3s_kernels.linear_ce import kernels

    x = torch.randn(4096 * 3 + 17).to(dtype)
    y = x.clone()
    kernels.scale_unless_one(y, torch.tensor([1.0]))
    assert torch.equal(y, x)
    kernels.scale_unless_one(y, torch.tensor([3.0]))
    torch.testing.assert_close(y, (x.float() * 3).to(dtype), rtol=0, atol=0)
