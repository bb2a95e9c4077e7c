"""Property-based tests (Hypothesis) of the public kernels against a float64 oracle written from the definitions.

Every example draws a shape (one row, V and D of any size, odd included), a dtype, every option of the functional
and a value regime, then checks each output and each gradient (with a random upstream gradient) against
:func:`oracle_ce` / ``naive_token_logprobs`` (float64, whole ``[N, V]`` logits, no library code), each within the
budget of the same computation done by plain PyTorch in the input dtype (``assert_close_to_oracle``: 2x that error
plus a few ulps of the value's scale).

Paths: ``impl="auto"`` on CPU (the chunked PyTorch path; fp32 / fp16 / bf16) and ``impl="triton"`` under the
Triton interpreter (fused and chunked strategies; fp32 / fp16 only: the interpreter's ``tl.dot`` on bf16 is
broken). The example budget and the replayed example database are set by the settings profiles of
``tests/kernels/conftest.py``; the seed is fixed, so every CI run tries the same examples.

Value regimes: ``normal`` (Gaussian, several scales); ``huge`` (small integers times powers of two, so every
logit is exact in any summation order and reaches about ±2^24, or ±2^14 in fp16 whose PyTorch baseline would
overflow beyond); ``ties`` (small integers: many exactly equal logits).
"""

from __future__ import annotations

import os

import pytest
import torch
from _lce_oracle import condition, grads_of, naive_token_logprobs
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from t3s_kernels import linear_cross_entropy, token_logprobs
from t3s_kernels.testing import EPS, max_abs_err

# A campaign passes its own seed (T3S_FUZZ_SEED) to try new examples; CI always tries the same ones.
FUZZ_SEED = int(os.environ.get("T3S_FUZZ_SEED", "22"))
# The interpreter runs a Triton program per tile in Python: a third of the profile's examples, smaller shapes.
INTERPRETER_EXAMPLES = max(1, settings.default.max_examples // 3)


# --------------------------------------------------------------------------------------------------------------
# the oracle, from the definitions
# --------------------------------------------------------------------------------------------------------------


def _transformed_logits(h, W, b, softcap, temperature, matmul_dtype, math_dtype):
    z = (h.reshape(-1, h.shape[-1]).to(matmul_dtype) @ W.to(matmul_dtype).t()).to(math_dtype)
    if b is not None:
        z = z + b.to(math_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def oracle_ce(h, W, b, targets, *, token_weight=None, class_weight=None, ignore_index=-100, reduction="mean",
              normalizer=None, label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0, shift=0,
              return_lse=False, matmul_dtype=torch.float64, math_dtype=torch.float64):
    """``(1 − ε)(lse − z_y) + ε(lse − Σz / V) + z_loss · lse²`` per scored position, weighted by
    ``token_weight · class_weight[y]`` (F.cross_entropy's class weight); positions ``t`` scored against
    ``targets[..., t + shift]``."""
    T = targets.shape[-1] if targets.dim() else 1
    k = min(shift, T)
    y = torch.cat([targets[..., k:], torch.full_like(targets[..., :k], ignore_index)], -1) if shift else targets
    z = _transformed_logits(h, W, b, softcap, temperature, matmul_dtype, math_dtype)
    y = y.reshape(-1)
    w = torch.ones(y.shape, dtype=math_dtype)
    if token_weight is not None:
        tw = token_weight.to(math_dtype)
        tw = torch.cat([tw[..., k:], torch.zeros_like(tw[..., :k])], -1) if shift else tw
        w = w * tw.reshape(-1)
    active = y != ignore_index
    y_safe = torch.where(active, y, torch.zeros_like(y)).long()
    if class_weight is not None:
        w = w * class_weight.to(math_dtype)[y_safe]
    active = active & (w != 0)
    w = torch.where(active, w, torch.zeros_like(w))
    lse = torch.logsumexp(z, -1)
    target_logit = z.gather(1, y_safe[:, None])[:, 0]
    per = ((1 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - z.sum(-1) / W.shape[0])
           + z_loss * lse**2)
    per = torch.where(active, per, torch.zeros_like(per)) * w
    lse = torch.where(active, lse, torch.zeros_like(lse)).reshape(targets.shape)
    if reduction == "none":
        loss = per.reshape(targets.shape)[..., : T - k] if shift else per.reshape(targets.shape)
    elif reduction == "sum":
        loss = per.sum()
    else:
        den = w.sum() if normalizer is None else torch.as_tensor(float(normalizer), dtype=math_dtype)
        loss = per.sum() / den if float(den) != 0 else per.sum() * 0
    if not return_lse:
        return loss
    return loss, lse[..., : T - k] if shift else lse


# --------------------------------------------------------------------------------------------------------------
# the tolerance: 2x the same-dtype PyTorch error + a few ulps of the condition
# --------------------------------------------------------------------------------------------------------------


def _assert_within_budget(name, actual, oracle, baseline, dtype, condition: float) -> None:
    if actual.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values")
    scale = max(1.0, oracle.double().abs().max().item() if oracle.numel() else 0.0, condition)
    err, base = max_abs_err(actual, oracle), max_abs_err(baseline, oracle)
    if not err <= 2 * base + EPS[dtype] * scale:
        raise AssertionError(f"{name}: max abs error {err:.3e} > 2 x PyTorch {dtype} error {base:.3e} + "
                             f"{EPS[dtype]:.0e} x condition {scale:.3e}")


def check_against_oracle(ours, naive, args, names, dtype, upstream):
    """``ours(h, W, b)``: fp32 outputs ``names`` and input-dtype gradients against ``naive`` in float64, each within
    2x the error of ``naive`` at the input dtype (fp32 maths) + a few ulps of the value's condition."""
    out, grads = grads_of(ours, args, upstream=upstream)
    out_o, grads_o = grads_of(naive, args, upstream=upstream)
    out_b, grads_b = grads_of(lambda *a: naive(*a, matmul_dtype=dtype, math_dtype=torch.float32), args,
                              upstream=upstream)
    conditions = condition(naive, *args, upstream, len(names))
    for name, a, o, bb, c in zip(names, out, out_o, out_b, conditions):
        assert a.dtype == torch.float32, f"{name}: {a.dtype}"
        _assert_within_budget(name, a, o, bb, dtype, c)
    for name, a, o, bb, c in zip(("d_hidden", "d_weight", "d_bias"), grads, grads_o, grads_b, conditions[-3:]):
        if o is not None:
            assert a.dtype == dtype, f"{name}: {a.dtype}"
            _assert_within_budget(name, a, o, bb, dtype, c)


# --------------------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------------------

PATHS = {
    # impl: (dtypes, max rows, max D, max V)
    "auto": ((torch.float32, torch.float16, torch.bfloat16), 40, 40, 300),
    "triton": ((torch.float32, torch.float16), 12, 20, 70),
}


@st.composite
def inputs(draw, impl: str):
    """``hidden [..., D]``, ``weight [V, D]``, optional ``bias``, ``targets [...]`` and the ``ignore_index``."""
    dtypes, max_rows, max_d, max_v = PATHS[impl]
    dtype = draw(st.sampled_from(dtypes))
    lead = draw(st.one_of(st.tuples(st.integers(1, max_rows)),
                          st.tuples(st.integers(1, 3), st.integers(1, max_rows // 3))))
    D, V = draw(st.integers(1, max_d)), draw(st.integers(1, max_v))
    regime = draw(st.sampled_from(["normal", "huge", "ties"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if regime == "normal":
        scale = draw(st.sampled_from([0.05, 1.0, 6.0]))
        hidden = torch.randn(*lead, D, generator=g) * scale
        weight = torch.randn(V, D, generator=g) / D**0.5
        bias = torch.randn(V, generator=g) * draw(st.sampled_from([0.5, 4.0]))
    else:  # integers in [-3, 3]: every dot product is exact; "huge" scales them by powers of two up to ~2^24
        top = 14 if dtype == torch.float16 else 24  # fp16's PyTorch baseline overflows at 65504
        exponent = top - (9 * D).bit_length() if regime == "huge" else 0  # |logit| <= 9·D·2^exponent
        hidden = torch.randint(-3, 4, (*lead, D), generator=g) * 2.0 ** (exponent // 2)
        weight = torch.randint(-3, 4, (V, D), generator=g) * 2.0 ** (exponent - exponent // 2)
        # on the logits' grid too: a fraction below their ulp is not defined in fp32 (rounding noise, no answer)
        bias = torch.randint(-9, 10, (V,), generator=g) * 2.0**exponent
    bias = bias if draw(st.booleans()) else None
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    targets = torch.randint(0, V, lead, generator=g)
    rows = draw(st.sampled_from(["some ignored", "none ignored", "all ignored", "one active"]))
    if rows == "some ignored":
        targets[torch.rand(lead, generator=g) < 0.3] = ignore_index
    elif rows == "all ignored":
        targets[:] = ignore_index
    elif rows == "one active":
        keep = targets.reshape(-1)[-1].item()
        targets[:] = ignore_index
        targets.reshape(-1)[draw(st.integers(0, targets.numel() - 1))] = keep
    cast = (lambda t: t.to(dtype)) if dtype != torch.float32 else (lambda t: t)
    return cast(hidden), cast(weight), None if bias is None else cast(bias), targets, ignore_index, dtype


def _transform(draw) -> dict:
    return dict(softcap=draw(st.sampled_from([None, None, 0.5, 5.0, 30.0])),
                temperature=draw(st.sampled_from([1.0, 1.0, 0.05, 0.7, 1.9])))


def _strategy(draw, impl: str, V: int) -> dict:
    """``strategy`` (Triton: fused / chunked) and ``workspace_bytes`` (a few rows per chunk: several chunks)."""
    kw = {"impl": impl}
    if impl == "triton":
        kw["strategy"] = draw(st.sampled_from(["auto", "fused", "chunked"]))
    if draw(st.booleans()):
        kw["workspace_bytes"] = draw(st.integers(1, 4)) * 3 * 4 * V
    return kw


def _token_weight(draw, g, targets, *, signed_ok: bool):
    kind = draw(st.sampled_from(["none", "none", "0/1", "positive", "signed" if signed_ok else "positive"]))
    if kind == "none":
        return None
    if kind == "0/1":
        return (torch.rand(targets.shape, generator=g) < 0.6).float()
    w = torch.rand(targets.shape, generator=g) * 2 * (torch.rand(targets.shape, generator=g) < 0.8)
    return w - 0.7 if kind == "signed" else w


@st.composite
def ce_options(draw, V: int, targets: torch.Tensor, ignore_index: int):
    """Every option of ``linear_cross_entropy`` that changes the result, with the argument rules it documents."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    normalizer = None
    if reduction == "mean" and draw(st.booleans()):
        normalizer = draw(st.sampled_from([0.5, 3.0, 40.0]))
        if draw(st.booleans()):
            normalizer = torch.tensor(normalizer)
    signed_ok = reduction != "mean" or normalizer is not None
    label_smoothing = draw(st.sampled_from([0.0, 0.0, 0.1, 0.9]))
    class_weight = None
    if label_smoothing == 0 and draw(st.booleans()):  # not combined with smoothing (documented ValueError)
        class_weight = torch.rand(V, generator=g) * 2 * (torch.rand(V, generator=g) < 0.8)
        if signed_ok and draw(st.booleans()):
            class_weight = class_weight - 0.5
    return dict(
        reduction=reduction, normalizer=normalizer, label_smoothing=label_smoothing, class_weight=class_weight,
        token_weight=_token_weight(draw, g, targets, signed_ok=signed_ok), ignore_index=ignore_index,
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-4, 0.3])), shift=draw(st.sampled_from([0, 0, 1, 2, 5])),
        return_lse=draw(st.booleans()), **_transform(draw),
    )


def _upstream(g, outs):
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


# --------------------------------------------------------------------------------------------------------------
# the properties
# --------------------------------------------------------------------------------------------------------------


def _check_linear_cross_entropy(data, impl: str):
    hidden, weight, bias, targets, ignore_index, dtype = data.draw(inputs(impl))
    opts = data.draw(ce_options(weight.shape[0], targets, ignore_index))
    kw = _strategy(data.draw, impl, weight.shape[0])
    names = ("loss", "lse") if opts["return_lse"] else ("loss",)

    def ours(h, W, b):
        return linear_cross_entropy(h, W, targets, bias=b, **opts, **kw)

    def naive(h, W, b, **dt):
        return oracle_ce(h, W, b, targets, **opts, **dt)

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():
        out = naive(hidden, weight, bias)
    upstream = _upstream(g, out if isinstance(out, tuple) else (out,))
    check_against_oracle(ours, naive, (hidden, weight, bias), names, dtype, upstream)


def _check_token_logprobs(data, impl: str):
    hidden, weight, bias, targets, ignore_index, dtype = data.draw(inputs(impl))
    transform = _transform(data.draw)
    want = (True, data.draw(st.booleans()), data.draw(st.booleans()))  # logprob, entropy, lse
    names = tuple(n for n, w in zip(("logprob", "entropy", "lse"), want) if w)
    kw = _strategy(data.draw, impl, weight.shape[0])

    def ours(h, W, b):
        r = token_logprobs(h, W, targets, bias=b, ignore_index=ignore_index, return_entropy=want[1],
                           return_lse=want[2], **transform, **kw)
        return tuple(o for o in r if o is not None)

    def naive(h, W, b, **dt):
        r = naive_token_logprobs(h, W, targets, bias=b, ignore_index=ignore_index, **transform, **dt)
        return tuple(o for o, w in zip(r, want) if w)

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    upstream = [torch.randn(targets.shape, generator=g, dtype=torch.float64) for _ in names]
    check_against_oracle(ours, naive, (hidden, weight, bias), names, dtype, upstream)


@seed(FUZZ_SEED)
@given(st.data())
def test_linear_cross_entropy_matches_fp64_oracle_on_cpu_default_path(data):
    _check_linear_cross_entropy(data, "auto")


@seed(FUZZ_SEED)
@given(st.data())
def test_token_logprobs_matches_fp64_oracle_on_cpu_default_path(data):
    _check_token_logprobs(data, "auto")


@pytest.mark.triton
@seed(FUZZ_SEED)
@settings(max_examples=INTERPRETER_EXAMPLES)
@given(st.data())
def test_linear_cross_entropy_matches_fp64_oracle_on_triton_kernels(data):
    _check_linear_cross_entropy(data, "triton")


@pytest.mark.triton
@seed(FUZZ_SEED)
@settings(max_examples=INTERPRETER_EXAMPLES)
@given(st.data())
def test_token_logprobs_matches_fp64_oracle_on_triton_kernels(data):
    _check_token_logprobs(data, "triton")
