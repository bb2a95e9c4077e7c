"""Cross-checks against implementations nobody here wrote.

(a) ``torch.nn.functional.linear_cross_entropy`` (PyTorch ≥ 2.10), both its reference path (``options=None``) and
    its chunked path (``options=LinearCrossEntropyOptions()``), where the features overlap: reductions
    mean / sum / none (with a random per-token upstream gradient), ``ignore_index``, ``label_smoothing``, bias.
(b) Liger-Kernel's ``liger_fused_linear_cross_entropy`` for mean / sum / none, ``ignore_index``,
    ``label_smoothing``, ``softcap`` and z-loss (``lse_square_scale``), compared with our ``impl="reference"`` and
    ``impl="triton"``. On CPU Liger runs under the Triton interpreter, which needs two work-arounds (fixture
    ``liger_on_interpreter``): see its docstring.

Tolerance rule (``t3s_kernels.testing.assert_close_to_oracle``): the float64 oracle is the other library's own
math in float64 where it has an fp64 path (PyTorch), or plain PyTorch float64 math written here (Liger has no
fp64 path); our fp32 result may be at most twice as far from the oracle as the other library's fp32 result, plus
an fp32 floor. Liger's own result is also checked against the oracle, so a broken work-around cannot pass silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from t3s_kernels import linear_cross_entropy
from t3s_kernels._triton import HAS_TRITON, interpreting
from t3s_kernels.testing import assert_close_to_oracle

HAS_CUDA = torch.cuda.is_available()
N, D, V = 21, 16, 75  # none a multiple of a tile


def _inputs(device, *, bias: bool, ignore_index: int = -100, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 3  # logits of O(3)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.randperm(N, generator=g)[:5]] = ignore_index
    go = torch.randn(N, generator=g, dtype=torch.float64)  # per-token upstream gradient for reduction="none"
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), y.to(device), cast(go)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _run(fn, h, w, b, go, reduction):
    """Loss and gradients (w.r.t. h, w, b) of ``fn(h, w, b)``; ``reduction="none"`` back-propagates ``go``."""
    h, w, b = _leaves(h, w, b)
    loss = fn(h, w, b)
    if reduction == "none":
        loss.backward(go.to(loss.dtype))
    else:
        loss.backward()
    grads = [h.grad, w.grad] + ([b.grad] if b is not None else [])
    return [loss.detach()] + grads


def _assert_all(case: str, actual, oracle, baseline):
    names = ["loss", "d_hidden", "d_weight", "d_bias"]
    assert len(actual) == len(oracle) == len(baseline)
    for name, a, o, bl in zip(names, actual, oracle, baseline, strict=False):
        assert a is not None, f"{case}: {name} missing"
        assert_close_to_oracle(f"{case}: {name}", a.to(o.device), o, bl.to(o.device), dtype=torch.float32)


def _our_impls(device):
    impls = ["reference"]
    if HAS_TRITON and (device.type == "cuda" or interpreting()):
        impls.append("triton")
    return impls


# ----------------------------------------------------------------------------------------------------------------
# (a) torch.nn.functional.linear_cross_entropy
# ----------------------------------------------------------------------------------------------------------------

torch_lce = getattr(F, "linear_cross_entropy", None)

TORCH_CASES = [
    pytest.param({"reduction": "mean"}, id="mean"),
    pytest.param({"reduction": "sum"}, id="sum"),
    pytest.param({"reduction": "none"}, id="none-random-grad"),
    pytest.param({"reduction": "mean", "bias": True}, id="mean-bias"),
    pytest.param({"reduction": "mean", "label_smoothing": 0.1}, id="mean-smoothing"),
    pytest.param({"reduction": "sum", "label_smoothing": 0.2, "bias": True}, id="sum-smoothing-bias"),
    pytest.param({"reduction": "none", "label_smoothing": 0.1, "bias": True}, id="none-smoothing-bias"),
    pytest.param({"reduction": "mean", "ignore_index": 7}, id="mean-ignore7"),
]


@pytest.mark.skipif(torch_lce is None, reason="torch.nn.functional.linear_cross_entropy needs PyTorch >= 2.10")
@pytest.mark.parametrize("torch_path", ["reference", "chunked"])
@pytest.mark.parametrize("case", TORCH_CASES)
def test_matches_torch_linear_cross_entropy(case, torch_path, device):
    reduction = case["reduction"]
    eps = case.get("label_smoothing", 0.0)
    ii = case.get("ignore_index", -100)
    h, w, b, y, go = _inputs(device, bias=case.get("bias", False), ignore_index=ii)
    if torch_path == "chunked" and eps > 0:
        pytest.skip("torch's chunked path has no label smoothing (it falls back to its reference path, tested)")
    options = torch.nn.LinearCrossEntropyOptions() if torch_path == "chunked" else None

    def theirs(options):
        return lambda h_, w_, b_: torch_lce(
            h_, w_, y, linear_bias=b_, reduction=reduction, ignore_index=ii, label_smoothing=eps, options=options
        )

    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = _run(theirs(None), d64(h), d64(w), d64(b), d64(go), reduction)
    baseline = _run(theirs(options), h, w, b, go, reduction)
    for impl in _our_impls(device):
        ours = _run(
            lambda h_, w_, b_, impl=impl: linear_cross_entropy(
                h_, w_, y, bias=b_, reduction=reduction, ignore_index=ii, label_smoothing=eps, impl=impl
            ),
            h, w, b, go, reduction,
        )
        _assert_all(f"torch[{torch_path}] vs t3s[{impl}]", ours, oracle, baseline)


# ----------------------------------------------------------------------------------------------------------------
# (b) Liger-Kernel
# ----------------------------------------------------------------------------------------------------------------

try:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
except Exception as exc:  # pragma: no cover - liger not installed / broken install
    liger_fused_linear_cross_entropy = None
    _LIGER_IMPORT_ERROR = repr(exc)
else:
    _LIGER_IMPORT_ERROR = ""


@pytest.fixture
def liger_on_interpreter(monkeypatch, device):
    """Let Liger's Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (triton 3.9).

    Two interpreter gaps, found by running Liger's ``liger_cross_entropy_kernel`` on CPU:

    1. Float kernel arguments stay Python ``float``s in the interpreter (``interpreter._implicit_cvt`` wraps
       bools, ints and pointers only), while compiled Triton passes them as fp32 scalars. Liger's kernel does
       ``softcap = softcap.to(tl.float32)`` → ``AttributeError: 'float' object has no attribute 'to'``. Fix: wrap
       floats as fp32 ``tl.tensor`` scalars, as the compiler does.
    2. ``triton.language.extra.libdevice.tanh`` is a stub resolved only at compile time; in the interpreter it
       returns ``None`` (→ ``'NoneType' object has no attribute 'dtype'``). Fix: rebind the ``tanh`` global of
       ``liger_kernel.ops.cross_entropy`` to a numpy ``tanh`` on the interpreter's tensor handle.

    Only the softcap path needs them; everything else in Liger's FLCE ran unmodified on CPU. On CUDA nothing is
    patched. Without the interpreter on a CPU-only machine the Liger tests are skipped.
    """
    if liger_fused_linear_cross_entropy is None:
        pytest.skip(f"liger-kernel not importable: {_LIGER_IMPORT_ERROR}")
    if device.type == "cuda":
        return
    if not (HAS_TRITON and interpreting()):
        pytest.skip("Liger's Triton kernels need CUDA or TRITON_INTERPRET=1 on CPU")
    import liger_kernel.ops.cross_entropy as liger_ce
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    real_cvt = interp._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return real_cvt(arg)

    def np_tanh(x, _semantic=None):
        return tl.tensor(interp.TensorHandle(np.tanh(x.handle.data), x.handle.dtype), x.type)

    monkeypatch.setattr(interp, "_implicit_cvt", implicit_cvt)
    monkeypatch.setattr(liger_ce, "tanh", np_tanh)


def _oracle_fn(y, *, reduction, ignore_index, label_smoothing, softcap, z_loss):
    """Plain-PyTorch math of Liger's FLCE: CE on ``cap(h Wᵀ + b)`` + ``z_loss · lse²``, over non-ignored tokens."""

    def fn(h, w, b):
        x = h @ w.t() + (b if b is not None else 0)
        z = softcap * torch.tanh(x / softcap) if softcap is not None else x
        ce = F.cross_entropy(z, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
        valid = y != ignore_index
        per_tok = ce + z_loss * torch.logsumexp(z, -1).pow(2) * valid
        if reduction == "none":
            return per_tok
        total = per_tok.sum()
        return total / valid.sum().clamp_min(1) if reduction == "mean" else total

    return fn


LIGER_CASES = [
    pytest.param({"reduction": "mean"}, id="mean"),
    pytest.param({"reduction": "sum"}, id="sum"),
    pytest.param({"reduction": "none"}, id="none-random-grad"),
    pytest.param({"reduction": "mean", "bias": True, "ignore_index": 3}, id="mean-bias-ignore3"),
    pytest.param({"reduction": "mean", "label_smoothing": 0.1}, id="mean-smoothing"),
    pytest.param({"reduction": "mean", "softcap": 2.5, "bias": True}, id="mean-softcap-bias"),
    pytest.param({"reduction": "sum", "softcap": 4.0, "label_smoothing": 0.1}, id="sum-softcap-smoothing"),
    pytest.param({"reduction": "mean", "z_loss": 1e-2}, id="mean-zloss"),
    pytest.param(
        {"reduction": "sum", "z_loss": 1e-3, "softcap": 3.0, "label_smoothing": 0.05, "bias": True}, id="sum-all"
    ),
]


@pytest.mark.triton
@pytest.mark.parametrize("case", LIGER_CASES)
def test_matches_liger_fused_linear_cross_entropy(case, device, liger_on_interpreter):
    reduction = case["reduction"]
    ii = case.get("ignore_index", -100)
    eps, cap, zl = case.get("label_smoothing", 0.0), case.get("softcap"), case.get("z_loss", 0.0)
    h, w, b, y, go = _inputs(device, bias=case.get("bias", False), ignore_index=ii)

    def liger(h_, w_, b_):
        return liger_fused_linear_cross_entropy(
            h_, w_, y, b_, ignore_index=ii, lse_square_scale=zl, label_smoothing=eps, reduction=reduction,
            softcap=cap,
        )

    spec = {"reduction": reduction, "ignore_index": ii, "label_smoothing": eps, "softcap": cap, "z_loss": zl}
    d64 = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    oracle = _run(_oracle_fn(y.cpu(), **spec), d64(h), d64(w), d64(b), d64(go), reduction)
    plain32 = _run(_oracle_fn(y, **spec), h, w, b, go, reduction)
    theirs = _run(liger, h, w, b, go, reduction)
    _assert_all("liger (sanity) vs plain fp32", theirs, oracle, plain32)
    for impl in _our_impls(device):
        ours = _run(
            lambda h_, w_, b_, impl=impl: linear_cross_entropy(
                h_, w_, y, bias=b_, reduction=reduction, ignore_index=ii, label_smoothing=eps, softcap=cap,
                z_loss=zl, impl=impl,
            ),
            h, w, b, go, reduction,
        )
        _assert_all(f"liger vs t3s[{impl}]", ours, oracle, theirs)
