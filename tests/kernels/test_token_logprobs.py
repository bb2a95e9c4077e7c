"""token_logprobs: Triton kernels against the float64 naive oracle with random upstream gradients on logprob,
entropy and LSE at once; the forward-only (no_grad) path; edge cases; argument validation."""

from __future__ import annotations

import pytest
import torch
from _lce_oracle import check_against_oracle, naive_token_logprobs

from t3s_kernels.linear_ce import TokenLogprobs, token_logprobs
from t3s_kernels.linear_ce import function as lce_function

F64 = torch.float64


def _inputs(shape, V, D, dtype, *, ignore_frac=0.2, bias=False, seed=0, h_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, D, generator=g, dtype=F64) * h_scale).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=F64) * (2.0 / D**0.5)).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    return h, W, b, y


def _check(h, W, b, y, dtype, **kw):
    g = torch.Generator().manual_seed(123)
    ups = [torch.randn(y.shape, generator=g) for _ in range(3)]

    def ours(h_, W_, b_):
        return tuple(token_logprobs(h_, W_, y, bias=b_, return_entropy=True, return_lse=True, impl="triton", **kw))

    def naive(h_, W_, b_, **dt):
        return naive_token_logprobs(h_, W_, y, bias=b_, **kw, **dt)

    out, _ = check_against_oracle(ours, naive, (h, W, b), ("logprob", "entropy", "lse"), dtype, upstream=ups,
                                  out_shape=y.shape)
    ignored = y == -100
    for t in out:
        assert (t[ignored] == 0).all()
    return out


CASES = [
    pytest.param((1,), 37, 19, dict(bias=True), dict(), id="N1-V37-D19-bias"),
    pytest.param((3, 13), 111, 45, dict(), dict(softcap=5.0, temperature=0.7), id="B3xT13-V111-D45-softcap-temp"),
    pytest.param((129,), 300, 70, dict(bias=True), dict(temperature=1.3), id="N129-V300-D70-bias"),
]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,V,D,inp,kw", CASES)
def test_triton_token_logprobs_all_outputs_and_grads(shape, V, D, inp, kw, dtype, poison_empty):
    h, W, b, y = _inputs(shape, V, D, dtype, **inp)
    _check(h, W, b, y, dtype, **kw)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_token_logprobs_chunked_backward(dtype, monkeypatch, poison_empty):
    """The cuBLAS-chunk backward (T3S_FUSED_BACKWARD=chunked), several chunks, softcap + bias + ignored rows."""
    from t3s_kernels.linear_ce import chunked

    real_plan = chunked.plan_chunks
    monkeypatch.setenv("T3S_FUSED_BACKWARD", "chunked")
    monkeypatch.setattr(chunked, "plan_chunks",
                        lambda *a, **k: real_plan(*a, **k)._replace(rows=6, stats_rows=3))
    h, W, b, y = _inputs((2, 11), 75, 28, dtype, bias=True, seed=8)
    _check(h, W, b, y, dtype, softcap=4.0, temperature=0.9)


@pytest.mark.triton
def test_triton_token_logprobs_huge_logits(poison_empty):
    h, W, b, y = _inputs((19,), 45, 16, torch.float32, h_scale=5e3, seed=4)
    logprob, entropy, lse = _check(h, W, b, y, torch.float32)
    assert (logprob <= 0).all() and (entropy >= 0).all()


@pytest.mark.triton
def test_triton_partial_upstream_only_entropy(poison_empty):
    """Only one output used in the loss (the others get no gradient)."""
    h, W, b, y = _inputs((17,), 53, 20, torch.float32, bias=True, seed=5)
    outs = {}
    for impl in ("reference", "triton"):
        hh, WW, bb = (t.clone().requires_grad_() for t in (h, W, b))
        out = token_logprobs(hh, WW, y, bias=bb, return_entropy=True, impl=impl)
        out.entropy.sum().backward()
        outs[impl] = (hh.grad, WW.grad, bb.grad)
    for a, r in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_no_grad_is_forward_only(impl, monkeypatch, poison_empty):
    h, W, b, y = _inputs((5, 7), 61, 24, torch.float32, bias=True)
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    monkeypatch.setattr(lce_function.LinearTokenStatsFunction, "apply",
                        lambda *a, **k: pytest.fail("autograd Function used under no_grad"))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t), torch.no_grad():
        out = token_logprobs(hg, Wg, y, bias=b, return_entropy=True, return_lse=True, impl=impl)
    assert packed == []
    assert not any(t.requires_grad for t in out)
    ref = naive_token_logprobs(h, W, y, bias=b)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_all_ignored_and_defaults(impl, poison_empty):
    h, W, b, y = _inputs((3, 4), 29, 12, torch.float32, ignore_frac=1.0)
    hg = h.clone().requires_grad_()
    out = token_logprobs(hg, W, y, impl=impl)
    assert isinstance(out, TokenLogprobs) and out.entropy is None and out.lse is None
    assert (out.logprob == 0).all()
    out.logprob.sum().backward()
    assert (hg.grad == 0).all()


@pytest.mark.parametrize(
    "override,exc,match",
    [
        pytest.param(dict(targets=torch.zeros(3, 4)), TypeError, "targets must be an integer", id="float-targets"),
        pytest.param(dict(weight=torch.randn(29, 11)), ValueError, "weight.shape\\[1\\]", id="D-mismatch"),
        pytest.param(dict(targets=torch.full((3, 4), 29)), ValueError, "targets must be in", id="tgt-range"),
        pytest.param(dict(temperature=-1.0), ValueError, "temperature", id="temperature"),
        pytest.param(dict(impl="fast"), ValueError, "impl must be one of", id="impl"),
    ],
)
def test_token_logprobs_bad_arguments(override, exc, match):
    h, W, _, y = _inputs((3, 4), 29, 12, torch.float32)
    args = dict(weight=W, targets=y)
    args.update(override)
    with pytest.raises(exc, match=match):
        token_logprobs(h, args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("grad", [False, True])
def test_accuracy_against_the_oracle(impl, grad, poison_empty):
    """``return_accuracy``: 1.0 where ``z_y`` is the row maximum, ties counted as correct (two vocabulary rows are
    duplicates, so their logits tie exactly in every precision, and some targets point at them), 0 at ignored
    positions; against an fp64 oracle of the same rule, from the same sweep as the log-probs (which stay exact)."""
    g = torch.Generator().manual_seed(5)
    N, V, D = 40, 23, 12
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    W[7] = W[3]  # classes 3 and 7 tie on every row
    h[1::4] = 3.0 * W[3] + 0.1 * h[1::4]  # rows where they are the maximum
    z = h @ W.t()
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = z.argmax(1)[::3]  # plenty of correct rows
    tie_rows = (z.argmax(1) == 3) | (z.argmax(1) == 7)
    y[tie_rows] = 7  # the second of the tied maxima: argmax alone would call it wrong
    y[::7] = -100
    assert tie_rows.any()
    hh, WW = h.float().requires_grad_(grad), W.float().requires_grad_(grad)
    out = token_logprobs(hh, WW, y, return_accuracy=True, impl=impl)
    z32 = (h.float() @ W.float().t()).double()  # the rule on the logits the call computes (fp32)
    active = y != -100
    safe_y = torch.where(active, y, 0)
    want = ((z32.gather(1, safe_y[:, None])[:, 0] >= z32.max(1).values) & active).float()
    assert out.accuracy.dtype == torch.float32 and not out.accuracy.requires_grad
    torch.testing.assert_close(out.accuracy, want, rtol=0, atol=0)
    assert out.accuracy[tie_rows & active].eq(1).all()
    ref = naive_token_logprobs(h, W, y)[0]
    torch.testing.assert_close(out.logprob.double(), ref, rtol=1e-5, atol=1e-5)
    if grad:
        out.logprob.sum().backward()
        assert torch.isfinite(hh.grad).all() and torch.isfinite(WW.grad).all()


def test_accuracy_needs_the_sweep():
    h, W, y = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="return_accuracy"):
        token_logprobs(h, W, y, return_accuracy=True, impl="reference")
    assert token_logprobs(h, W, y).accuracy is None
