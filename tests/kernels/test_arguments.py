"""Arguments that used to be silently misread by linear_cross_entropy / token_logprobs, and their edges.

Oracle: ``torch.nn.functional.cross_entropy`` on materialised fp64 logits (independent of both backends). Each
test names the behaviour it pins; the tolerances are fp32-accumulation ones (the backends compute in fp32 from
fp32 inputs, the oracle in fp64): 1e-5 relative on losses and gradients of size-1 inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from t3s_kernels import linear_cross_entropy, token_logprobs
from t3s_kernels._triton import HAS_TRITON

IMPLS = ["reference", pytest.param("triton", marks=[
    pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")])]
RTOL, ATOL = 1e-5, 1e-6


def _inputs(B=2, T=7, D=12, V=19, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        y[0, 1] = -100
        y[1, T // 2] = -100
    return h, W, y


def _oracle(h, W, y, *, reduction, shift=0, token_weight=None, class_weight=None, normalizer=None, z_loss=0.0):
    """F.cross_entropy on fp64 logits; token weights multiply per-token losses, the mean divides by
    Σ class_weight[yᵢ]·wᵢ (or the normaliser)."""
    h64, W64 = h.double(), W.double()
    if shift:
        h64, y = h64[..., :-shift, :], y[..., shift:]
        token_weight = token_weight[..., shift:] if token_weight is not None else None
    logits = h64 @ W64.t()
    cw = class_weight.double() if class_weight is not None else None
    per = F.cross_entropy(logits.flatten(0, -2), y.flatten(), weight=cw, reduction="none").view(y.shape)
    active = (y != -100).double()
    cw_y = cw[y.clamp(min=0)] * active if cw is not None else active
    if z_loss:
        per = per + z_loss * torch.logsumexp(logits, -1) ** 2 * cw_y
    tw = token_weight.double() if token_weight is not None else torch.ones_like(per)
    per = per * tw
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    den = (cw_y * tw).sum() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float64)
    return per.sum() / den if den != 0 else per.sum() * 0


def _close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def _check_grads(impl, kwargs, oracle_kwargs, *, h, W, y, strategy="auto"):
    """Loss and d(hidden), d(weight) against the oracle, with a random upstream gradient for reduction='none'."""
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = linear_cross_entropy(hh, WW, y, impl=impl, strategy=strategy, **kwargs)
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    ref = _oracle(h64, W64, y, **oracle_kwargs)
    _close(out, ref)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * g.float()).sum().backward()
    (ref * g).sum().backward()
    _close(hh.grad, h64.grad)
    _close(WW.grad, W64.grad)


# ----------------------------------------------------------------------------------------------------------------
# shift
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [2, 3])
def test_integer_shift_scores_t_against_t_plus_shift(impl, reduction, shift):
    """CCE's integer shift: position t against targets[t + shift] (shift=2 used to run as a 1-token shift)."""
    h, W, y = _inputs()
    tw = torch.rand(y.shape, generator=torch.Generator().manual_seed(1))
    kw = dict(reduction=reduction, shift=shift, token_weight=tw)
    _check_grads(impl, kw, kw, h=h, W=W, y=y)
    if reduction == "none":
        assert linear_cross_entropy(h, W, y, **kw, impl=impl).shape == (2, 7 - shift)


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_shift_return_lse_shape_and_values(impl):
    h, W, y = _inputs()
    loss, lse = linear_cross_entropy(h, W, y, shift=2, reduction="none", return_lse=True, impl=impl)
    ref_lse = torch.logsumexp(h[..., :-2, :].double() @ W.double().t(), -1) * (y[..., 2:] != -100)
    assert loss.shape == lse.shape == (2, 5)
    _close(lse, ref_lse)


def test_shift_true_is_shift_one_and_numpy_ints_are_accepted():
    np = pytest.importorskip("numpy")
    h, W, y = _inputs()
    one = linear_cross_entropy(h, W, y, shift=1, reduction="none")
    torch.testing.assert_close(linear_cross_entropy(h, W, y, shift=True, reduction="none"), one, rtol=0, atol=0)
    torch.testing.assert_close(linear_cross_entropy(h, W, y, shift=np.int64(1), reduction="none"), one, rtol=0,
                               atol=0)


def test_shift_at_least_the_sequence_length_scores_nothing():
    h, W, y = _inputs(T=3)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, W, y, shift=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hh.grad) == 0
    assert linear_cross_entropy(h, W, y, shift=5, reduction="none").shape == (2, 0)


@pytest.mark.parametrize("bad,exc", [(2.0, TypeError), (1.5, TypeError), ("1", TypeError), (None, TypeError),
                                     (-1, ValueError)])
def test_non_integer_or_negative_shift_is_refused(bad, exc):
    h, W, y = _inputs()
    with pytest.raises(exc, match="shift"):
        linear_cross_entropy(h, W, y, shift=bad)


# ----------------------------------------------------------------------------------------------------------------
# signed weights and normalisers
# ----------------------------------------------------------------------------------------------------------------


def _signed_weights(shape, seed=2):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w[0, 2] = 0.0
    return w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_signed_weights_allowed_for_sum_and_none(impl, reduction):
    h, W, y = _inputs()
    kw = dict(reduction=reduction, token_weight=_signed_weights(y.shape))
    _check_grads(impl, kw, kw, h=h, W=W, y=y)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_signed_weights_chunked_strategy():
    h, W, y = _inputs()
    kw = dict(reduction="sum", token_weight=_signed_weights(y.shape))
    _check_grads("triton", kw, kw, h=h, W=W, y=y, strategy="chunked")


@pytest.mark.parametrize("impl", IMPLS)
def test_signed_weights_with_a_normalizer_divide_by_it(impl):
    h, W, y = _inputs()
    kw = dict(reduction="mean", token_weight=_signed_weights(y.shape), normalizer=torch.tensor(9.0))
    _check_grads(impl, kw, kw, h=h, W=W, y=y)


def test_negative_weight_under_mean_without_normalizer_is_refused():
    """Weights summing to 0 used to return Σ wᵢ·lossᵢ (the denominator became 1) under reduction='mean'."""
    h, W, y = _inputs(ignore=False)
    w = torch.zeros(y.shape)
    w[0, 0], w[0, 1] = 1.0, -1.0
    with pytest.raises(ValueError, match="token_weight must be >= 0 for reduction='mean'"):
        linear_cross_entropy(h, W, y, token_weight=w)


@pytest.mark.parametrize("bad", [-3.0, float("nan"), float("inf"), torch.tensor(-1.0), torch.tensor(float("inf"))],
                         ids=["neg", "nan", "inf", "neg-tensor", "inf-tensor"])
def test_negative_or_non_finite_normalizer_is_refused(bad):
    h, W, y = _inputs()
    with pytest.raises(ValueError, match="normalizer must be finite and >= 0"):
        linear_cross_entropy(h, W, y, normalizer=bad)


@pytest.mark.parametrize("zero", [0.0, 0, torch.tensor(0.0), torch.tensor(0)], ids=["f", "i", "tf", "ti"])
def test_zero_normalizer_with_tokens_is_refused(zero):
    h, W, y = _inputs()
    with pytest.raises(ValueError, match="normalizer is 0 but some tokens have a nonzero weight"):
        linear_cross_entropy(h, W, y, normalizer=zero)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("zero", [0.0, torch.tensor(0.0)], ids=["float", "tensor"])
def test_zero_normalizer_on_an_empty_step_gives_zero(impl, zero):
    h, W, y = _inputs()
    w = torch.zeros(y.shape)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, W, y, token_weight=w, normalizer=zero, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(hh.grad).all() and torch.count_nonzero(hh.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_never_returns_the_sum_even_with_checks_off(impl, monkeypatch):
    """On CUDA the value checks are asynchronous: whatever the check does, a zero denominator must give 0, never the
    undivided sum (checks switched off here to reach the reduction with a zero normaliser and live tokens)."""
    from t3s_kernels.linear_ce import _checks

    monkeypatch.setattr(_checks, "value_check_mode", lambda device: "skip")
    h, W, y = _inputs()
    for zero in (0.0, torch.tensor(0.0)):
        hh = h.clone().requires_grad_()
        loss = linear_cross_entropy(hh, W, y, normalizer=zero, impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(hh.grad) == 0


def test_value_checks_run_as_device_asserts_without_host_sync(monkeypatch):
    """The CUDA mode (no eager check): every value check is a torch._assert_async, and nothing reads a value on the
    host. Simulated on CPU, where _assert_async fails at once with the same message."""
    from t3s_kernels.linear_ce import _checks

    monkeypatch.setattr(_checks, "value_check_mode", lambda device: "async")
    h, W, y = _inputs()
    cases = [
        (dict(normalizer=torch.tensor(-1.0)), "normalizer must be finite"),
        (dict(normalizer=torch.tensor(0.0)), "normalizer is 0"),
        (dict(token_weight=-torch.ones(y.shape)), "token_weight must be >= 0"),
        (dict(class_weight=-torch.ones(W.shape[0])), "class_weight must be finite and >= 0"),
    ]
    for kw, match in cases:
        with pytest.raises(RuntimeError, match=match):
            linear_cross_entropy(h, W, y, **kw)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in a value check")

    ok = dict(token_weight=torch.rand(y.shape), class_weight=torch.rand(W.shape[0]), normalizer=torch.tensor(3.0))
    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
            m.setattr(torch.Tensor, name, no_sync)
        loss = linear_cross_entropy(h, W, y, impl="reference", **ok)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------------------
# class weights (torch.nn.functional.cross_entropy's weight=[V])
# ----------------------------------------------------------------------------------------------------------------


def _class_weight(V=19, seed=3):
    cw = torch.rand(V, generator=torch.Generator().manual_seed(seed)) * 2
    cw[4] = 0.0
    return cw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_token_weight", [False, True], ids=["cw", "cw+tw"])
def test_class_weight_matches_f_cross_entropy(impl, reduction, with_token_weight):
    h, W, y = _inputs()
    y[1, 2] = 4  # a class of weight 0
    kw = dict(reduction=reduction, class_weight=_class_weight())
    if with_token_weight:
        kw["token_weight"] = torch.rand(y.shape, generator=torch.Generator().manual_seed(4))
    _check_grads(impl, kw, kw, h=h, W=W, y=y)


def test_class_weight_plain_mean_is_f_cross_entropy_exactly_as_defined():
    """No token weight: the result is F.cross_entropy(logits, y, weight=cw, ignore_index=-100) itself."""
    h, W, y = _inputs()
    cw = _class_weight()
    ref = F.cross_entropy((h.double() @ W.double().t()).flatten(0, 1), y.flatten(), weight=cw.double())
    _close(linear_cross_entropy(h, W, y, class_weight=cw), ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_class_weight_with_shift_normalizer_and_z_loss(impl):
    h, W, y = _inputs()
    kw = dict(reduction="mean", class_weight=_class_weight(), shift=1, normalizer=11.0, z_loss=1e-2)
    _check_grads(impl, kw, kw, h=h, W=W, y=y)


def test_class_weight_signed_allowed_for_sum():
    h, W, y = _inputs()
    cw = torch.randn(W.shape[0], generator=torch.Generator().manual_seed(6))
    kw = dict(reduction="sum", class_weight=cw)
    _check_grads("reference", kw, kw, h=h, W=W, y=y)


@pytest.mark.parametrize("bad,kw,exc,match", [
    (torch.ones(18), {}, ValueError, r"class_weight must have shape \[V\] = \(19,\)"),
    (torch.ones(19, dtype=torch.long), {}, TypeError, "class_weight must be a float"),
    ([1.0] * 19, {}, TypeError, "class_weight must be a torch.Tensor"),
    (torch.full((19,), float("nan")), {}, ValueError, "class_weight must be finite"),
    (-torch.ones(19), {}, ValueError, "class_weight must be finite and >= 0 for reduction='mean'"),
    (torch.ones(19), dict(label_smoothing=0.1), ValueError, "class_weight with label_smoothing"),
    (torch.ones(19, device="meta"), {}, ValueError, "class_weight must be on cpu"),
], ids=["shape", "dtype", "list", "nan", "negative-mean", "smoothing", "device"])
def test_bad_class_weight_is_refused(bad, kw, exc, match):
    h, W, y = _inputs()
    with pytest.raises(exc, match=match):
        linear_cross_entropy(h, W, y, class_weight=bad, **kw)


# ----------------------------------------------------------------------------------------------------------------
# meta tensors and torch.func
# ----------------------------------------------------------------------------------------------------------------


def test_meta_tensors_give_shapes_and_dtypes():
    h, W, y = (t.to("meta") for t in _inputs())
    assert linear_cross_entropy(h, W, y).shape == ()
    loss, lse = linear_cross_entropy(h, W, y, reduction="none", shift=2, return_lse=True,
                                     token_weight=torch.ones(y.shape, device="meta"))
    assert loss.is_meta and loss.shape == lse.shape == (2, 5) and loss.dtype == torch.float32
    out = token_logprobs(h.half(), W.half(), y, return_entropy=True, return_lse=True)
    assert all(t.is_meta and t.shape == (2, 7) and t.dtype == torch.float32 for t in out)
    hh = h.clone().requires_grad_()
    linear_cross_entropy(hh, W, y, class_weight=torch.ones(19, device="meta")).backward()
    assert hh.grad.is_meta and hh.grad.shape == h.shape


TRANSFORMS = {
    "vmap": lambda f, h: torch.vmap(f)(h),
    "grad": lambda f, h: torch.func.grad(lambda x: f(x).sum())(h),
    "jvp": lambda f, h: torch.func.jvp(f, (h,), (torch.ones_like(h),)),
    "jacrev": lambda f, h: torch.func.jacrev(lambda x: f(x).sum())(h),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("op", ["linear_cross_entropy", "token_logprobs"])
def test_torch_func_transforms_raise_a_clear_error(op, transform):
    h, W, y = _inputs(ignore=False)
    if op == "linear_cross_entropy":
        def f(x):
            return linear_cross_entropy(x, W, y[0] if transform == "vmap" else y)
    else:
        def f(x):
            return token_logprobs(x, W, y[0] if transform == "vmap" else y).logprob
    with pytest.raises(TypeError, match=f"{op} does not support torch.func transforms"):
        TRANSFORMS[transform](f, h)


def test_torch_func_over_targets_only_is_caught_too():
    h, W, y = _inputs(ignore=False)
    with pytest.raises(TypeError, match="targets traced by torch.func vmap"):
        torch.vmap(lambda t: linear_cross_entropy(h[0], W, t), in_dims=0)(y)


def test_loss_module_holds_class_weight_as_a_buffer():
    from t3s_kernels import LinearCrossEntropyLoss

    h, W, y = _inputs()
    cw = _class_weight()
    mod = LinearCrossEntropyLoss(class_weight=cw, shift=2)
    assert "class_weight" in dict(mod.named_buffers())
    _close(mod(h, W, y), _oracle(h, W, y, reduction="mean", class_weight=cw, shift=2))
