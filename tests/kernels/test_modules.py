"""The ``nn.Module`` drop-ins only hold options: functional == module, outputs and gradients, bit for bit."""

from __future__ import annotations

import pytest
import torch

from t3s_kernels import (
    LinearCrossEntropyLoss,
    LinearTokenLogprobs,
    TokenLogprobs,
    linear_cross_entropy,
    token_logprobs,
)
from t3s_kernels._triton import HAS_TRITON, interpreting

B, T, D, V = 2, 7, 12, 41


def _impls():
    out = ["reference"]
    if HAS_TRITON and (torch.cuda.is_available() or interpreting()):
        out.append(pytest.param("triton", marks=pytest.mark.triton))
    return out


def _inputs(device, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    b = torch.randn(V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 1] = y[1, 4] = ignore_index
    tw = (torch.rand(B, T, generator=g) < 0.7).float() * 1.5
    return [t.to(device) for t in (h, w, b, y, tw)]


def _grads(fn, h, w, b):
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    out = fn(h, w, b)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    g = torch.Generator().manual_seed(3)
    total = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs], [h.grad, w.grad, b.grad]


LCE_OPTIONS = [
    pytest.param({}, id="defaults"),
    pytest.param({"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3}, id="sum-smooth-z"),
    pytest.param({"reduction": "none", "softcap": 3.0, "temperature": 0.7}, id="none-softcap-temp"),
    pytest.param({"shift": True, "return_lse": True}, id="shift-lse"),
    pytest.param({"ignore_index": 5, "strategy": "fused"}, id="ignore5-fused"),
]


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("opts", LCE_OPTIONS)
@pytest.mark.parametrize("per_call", ["plain", "weight-bias-normalizer"])
def test_linear_cross_entropy_module_equals_functional(opts, impl, per_call, device):
    h, w, b, y, tw = _inputs(device, ignore_index=opts.get("ignore_index", -100))
    call = {}
    if per_call != "plain":
        call = {"bias": b, "token_weight": tw}
        if opts.get("reduction", "mean") == "mean":
            call["normalizer"] = torch.tensor(9.0, device=device)
    module = LinearCrossEntropyLoss(**opts, impl=impl)
    assert list(module.parameters()) == [] and list(module.buffers()) == []

    def functional(h_, w_, b_):
        kw = dict(call, bias=b_) if "bias" in call else call
        return linear_cross_entropy(h_, w_, y, **kw, **opts, impl=impl)

    def via_module(h_, w_, b_):
        kw = dict(call)
        bias = kw.pop("bias", None)
        return module(h_, w_, y, bias=b_ if bias is not None else None, **kw)

    out_f, grads_f = _grads(functional, h, w, b)
    out_m, grads_m = _grads(via_module, h, w, b)
    assert len(out_f) == len(out_m) == (2 if opts.get("return_lse") else 1)
    for a, c in zip(out_m, out_f, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    for a, c in zip(grads_m, grads_f, strict=True):
        if c is None:
            assert a is None
        else:
            torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize(
    "opts",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"return_entropy": True, "return_lse": True, "softcap": 2.0}, id="all-outputs-softcap"),
        pytest.param({"return_entropy": True, "temperature": 1.3, "ignore_index": 4}, id="entropy-temp-ignore4"),
    ],
)
def test_token_logprobs_module_equals_functional(opts, impl, device):
    h, w, b, y, _ = _inputs(device, ignore_index=opts.get("ignore_index", -100))
    module = LinearTokenLogprobs(**opts, impl=impl)
    assert list(module.parameters()) == []
    out_f, grads_f = _grads(lambda h_, w_, b_: tuple(token_logprobs(h_, w_, y, bias=b_, **opts, impl=impl)), h, w, b)
    out_m, grads_m = _grads(lambda h_, w_, b_: tuple(module(h_, w_, y, bias=b_)), h, w, b)
    for a, c in zip(out_m + grads_m, out_f + grads_f, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    res = module(h, w, y)
    assert isinstance(res, TokenLogprobs)
    assert (res.entropy is not None) == bool(opts.get("return_entropy"))
    assert (res.lse is not None) == bool(opts.get("return_lse"))


def test_modules_repr_lists_options():
    assert "z_loss=0.01" in repr(LinearCrossEntropyLoss(z_loss=0.01))
    assert "return_entropy=True" in repr(LinearTokenLogprobs(return_entropy=True))
