"""The pure-PyTorch reference (the CPU path and the oracle of the kernels) against a naive full-logits float64
computation: every option, every output and every gradient."""

from __future__ import annotations

import pytest
import torch
from _lce_oracle import grads_of, naive_ce, naive_token_logprobs

from t3s_kernels.linear_ce import linear_cross_entropy, token_logprobs
from t3s_kernels.linear_ce.reference import reference_token_stats
from t3s_kernels.testing import assert_close_to_oracle

F64 = torch.float64


def _inputs(shape, V, D, *, dtype=F64, ignore_frac=0.25, bias=False, weights=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, D, generator=g, dtype=F64) * scale).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=F64) / D**0.5 * 2).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    w = None
    if weights:
        w = torch.rand(shape, generator=g, dtype=F64).to(torch.float32)
        w[torch.rand(shape, generator=g) < 0.3] = 0.0
    return h, W, b, y, w


def _close(name, a, b, tol=1e-9):
    assert a.shape == b.shape, (name, a.shape, b.shape)
    assert torch.isfinite(a).all(), name
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.double().abs().max().item() if b.numel() else 1.0)
    assert err <= tol * scale, f"{name}: err {err:.3e}"


CE_CASES = [
    pytest.param(dict(), dict(), id="plain-mean"),
    pytest.param(dict(bias=True), dict(), id="bias"),
    pytest.param(dict(), dict(softcap=3.0, temperature=0.7), id="softcap-temperature"),
    pytest.param(dict(), dict(label_smoothing=0.1, z_loss=1e-2), id="smoothing-zloss"),
    pytest.param(dict(weights=True), dict(), id="token-weight-mean"),
    pytest.param(dict(weights=True), dict(normalizer=torch.tensor(17.0)), id="token-weight-normalizer-tensor"),
    pytest.param(dict(), dict(normalizer=11.0), id="normalizer-float"),
    pytest.param(dict(bias=True, weights=True), dict(reduction="sum", label_smoothing=0.2), id="sum"),
    pytest.param(dict(bias=True, weights=True), dict(reduction="none", softcap=2.0, z_loss=1e-3), id="none"),
    pytest.param(dict(ignore_frac=1.0), dict(), id="all-ignored"),
    pytest.param(dict(bias=True), dict(return_lse=True, z_loss=1e-3), id="return-lse"),
]


@pytest.mark.parametrize("opt_in,kw", CE_CASES)
def test_reference_ce_matches_naive_fp64(opt_in, kw):
    h, W, b, y, w = _inputs((3, 7), 23, 13, **opt_in)
    kw = dict(kw)
    n_out = 2 if kw.get("return_lse") else 1
    g = torch.Generator().manual_seed(1)
    out_shape = y.shape if kw.get("reduction") == "none" else ()
    upstream = [torch.randn(out_shape, generator=g, dtype=F64)]
    if n_out == 2:
        upstream.append(torch.randn(y.shape, generator=g, dtype=F64))

    def ours(h_, W_, b_):
        return linear_cross_entropy(h_, W_, y, bias=b_, token_weight=w, impl="reference", **kw)

    def naive(h_, W_, b_):
        return naive_ce(h_, W_, y, bias=b_, token_weight=w, **kw)

    out, grads = grads_of(ours, (h, W, b), upstream=upstream)
    out_n, grads_n = grads_of(naive, (h, W, b), upstream=upstream)
    for name, a, e in zip(("loss", "lse"), out, out_n):
        _close(name, a, e)
    for name, a, e in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_n):
        if e is not None:
            _close(name, a, e)
    if opt_in.get("ignore_frac") == 1.0:
        assert out[0].item() == 0.0 and all(g_ is None or (g_ == 0).all() for g_ in grads)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_shift(reduction):
    h, W, b, y, w = _inputs((2, 9), 19, 11, bias=True, weights=True, ignore_frac=0.1)
    kw = dict(reduction=reduction, shift=True, return_lse=True, label_smoothing=0.05)
    out, grads = grads_of(lambda *a: linear_cross_entropy(*a[:2], y, bias=a[2], token_weight=w, **kw), (h, W, b))
    out_n, grads_n = grads_of(lambda *a: naive_ce(*a[:2], y, bias=a[2], token_weight=w, **kw), (h, W, b))
    if reduction == "none":
        assert out[0].shape == (2, 8)
    assert out[1].shape == (2, 8)
    for a, e in zip(out + tuple(grads), out_n + tuple(grads_n)):
        _close("shift", a, e)


def test_naive_oracle_agrees_with_torch_cross_entropy():
    h, W, _, y, _ = _inputs((40,), 17, 8)
    logits = h @ W.t()
    for eps in (0.0, 0.3):
        ref = torch.nn.functional.cross_entropy(logits, y, label_smoothing=eps, ignore_index=-100)
        _close("oracle", naive_ce(h, W, y, label_smoothing=eps), ref, 1e-12)


def test_reference_token_logprobs_all_outputs_all_grads():
    h, W, b, y, _ = _inputs((4, 6), 29, 10, bias=True)
    g = torch.Generator().manual_seed(2)
    ups = [torch.randn(y.shape, generator=g, dtype=F64) for _ in range(3)]
    kw = dict(softcap=4.0, temperature=1.5)

    def ours(h_, W_, b_):
        return tuple(token_logprobs(h_, W_, y, bias=b_, return_entropy=True, return_lse=True, impl="reference", **kw))

    out, grads = grads_of(ours, (h, W, b), upstream=ups)
    out_n, grads_n = grads_of(lambda *a: naive_token_logprobs(*a[:2], y, bias=a[2], **kw), (h, W, b), upstream=ups)
    for a, e in zip(out + tuple(grads), out_n + tuple(grads_n)):
        _close("token_logprobs", a, e)


def test_reference_chunking_is_invisible():
    """Small chunks (checkpointed backward) give the same outputs and gradients as one chunk."""
    h, W, b, y, _ = _inputs((37,), 31, 9, bias=True)
    res = []
    ups = [torch.randn(37, dtype=F64) for _ in range(4)]
    for rows in (5, 1000):
        def f(h_, W_, b_, rows=rows):
            s = reference_token_stats(h_, W_, y, bias=b_, want_sumz=True, want_entropy=True, chunk_rows=rows)
            return tuple(s)

        res.append(grads_of(f, (h, W, b), upstream=ups))
    (o1, g1), (o2, g2) = res
    for a, e in zip(o1 + tuple(g1), o2 + tuple(g2)):
        _close("chunks", a, e, 1e-12)


def test_reference_fp32_within_precision_budget():
    h, W, b, y, w = _inputs((50,), 97, 33, dtype=torch.float32, bias=True, weights=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)

    def run(fn, dt, **extra):
        return grads_of(lambda *a: fn(*a[:2], y, bias=a[2], token_weight=w, **kw, **extra), (h, W, b))

    (o,), g = run(linear_cross_entropy, None, impl="reference")
    (on,), gn = run(naive_ce, None)
    (ob,), gb = run(naive_ce, None, matmul_dtype=torch.float32, math_dtype=torch.float32)
    assert o.dtype == torch.float32
    assert_close_to_oracle("loss", o, on, ob, dtype=torch.float32)
    for name, a, e, bb in zip(("dh", "dW", "db"), g, gn, gb):
        assert_close_to_oracle(name, a, e, bb, dtype=torch.float32)


def test_reference_large_vocab_262144():
    V = 262144
    h, W, _, y, _ = _inputs((3,), V, 8, dtype=torch.float32, ignore_frac=0.0, seed=3)
    (o,), g = grads_of(lambda a, b_, c: linear_cross_entropy(a, b_, y, impl="reference"), (h, W, None))
    (on,), gn = grads_of(lambda a, b_, c: naive_ce(a, b_, y), (h, W, None))
    (ob,), gb = grads_of(lambda a, b_, c: naive_ce(a, b_, y, matmul_dtype=torch.float32, math_dtype=torch.float32),
                         (h, W, None))
    assert_close_to_oracle("loss", o, on, ob, dtype=torch.float32)
    assert_close_to_oracle("dh", g[0], gn[0], gb[0], dtype=torch.float32)
    assert_close_to_oracle("dW", g[1], gn[1], gb[1], dtype=torch.float32)


@pytest.mark.parametrize("workspace_bytes", [None, 13 * 4 * 3], ids=["one chunk", "chunks of 3 rows"])
def test_auto_on_cpu_runs_chunked_path_with_reference_forward_and_oracle_gradients(monkeypatch, workspace_bytes):
    """``impl="auto"`` on CPU goes through the chunked PyTorch path (the reference does not); its forward equals
    the reference bit for bit; its gradients are within the fp32 budget of the float64 oracle."""
    from t3s_kernels.linear_ce import dispatch

    calls = []
    real = dispatch.chunked_cross_entropy
    monkeypatch.setattr(dispatch, "chunked_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, W, b, y, w = _inputs((5, 4), 13, 7, dtype=torch.float32, bias=True, weights=True)
    kw = dict(token_weight=w, label_smoothing=0.1)
    r = linear_cross_entropy(h, W, y, bias=b, impl="reference", **kw)
    assert not calls
    (a,), g = grads_of(lambda h_, W_, b_: linear_cross_entropy(h_, W_, y, bias=b_, workspace_bytes=workspace_bytes,
                                                                **kw), (h, W, b))
    assert calls, "impl='auto' on CPU did not take the chunked path"
    assert torch.equal(a, r)
    _, gn = grads_of(lambda h_, W_, b_: naive_ce(h_, W_, y, bias=b_, **kw), (h, W, b))
    _, gb = grads_of(lambda h_, W_, b_: naive_ce(h_, W_, y, bias=b_, matmul_dtype=torch.float32,
                                                  math_dtype=torch.float32, **kw), (h, W, b))
    for name, got, oracle, base in zip(("dh", "dW", "db"), g, gn, gb):
        assert_close_to_oracle(name, got, oracle, base, dtype=torch.float32)
