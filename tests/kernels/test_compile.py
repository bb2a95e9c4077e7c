"""``torch.compile(fullgraph=True)`` through the public functionals: zero graph breaks (``torch._dynamo.explain``),
the same numbers as eager, and the ``torch.library`` ops pass ``opcheck`` (schema, fake tensors, autograd).

The compiled graph calls ``t3s::lce_reduced`` (mean / sum with gradients) or ``t3s::token_stats`` (+ its recompute
backward) — see :mod:`t3s_kernels.linear_ce.ops`. CPU runs the reference behind the ops (and, once, the Triton
kernels under the interpreter); the ``gpu`` test runs the Triton impl and checks that the step never syncs.
"""

import pytest
import torch
import torch._dynamo

from t3s_kernels import linear_cross_entropy, token_logprobs

D, V = 8, 29


@pytest.fixture
def setup():
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D)
    W = torch.nn.Parameter(torch.randn(V, D) / 3)
    b = torch.nn.Parameter(torch.randn(V))
    x = torch.randn(2, 7, D)
    y = torch.randint(0, V, (2, 7))
    y[0, 2] = -100
    tw = torch.rand(2, 7) * (torch.rand(2, 7) > 0.3)
    return lin, W, b, x, y, tw


def _grads(params):
    out = [p.grad.clone() if p.grad is not None else None for p in params]
    for p in params:
        p.grad = None
    return out


def _assert_close(a, b, what):
    if isinstance(a, torch.Tensor):
        tol = 8 * torch.finfo(torch.float32).eps * max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= tol, what
    else:
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{what}[{i}]")


CE_CASES = {
    "mean+weights+smooth+zloss": dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, weights=True),
    "sum+softcap": dict(reduction="sum", softcap=3.0, temperature=0.8),
    "mean+normalizer": dict(reduction="mean", weights=True, normalizer=True),
    "none+random-grad": dict(reduction="none", weights=True),
    "mean+return_lse": dict(reduction="mean", return_lse=True),
    "mean+class_weight+shift2": dict(reduction="mean", class_weight=True, shift=2),
}


@pytest.mark.parametrize("case", list(CE_CASES))
def test_compiled_training_step_matches_eager(setup, case):
    lin, W, b, x, y, tw = setup
    c = dict(CE_CASES[case])
    weights, use_norm = c.pop("weights", False), c.pop("normalizer", False)
    if c.pop("class_weight", False):
        c["class_weight"] = torch.rand(V) + 0.5
    c.setdefault("shift", True)
    g_out = torch.randn(2, 6)
    norm = torch.tensor(17.0)

    def fwd(x, y, tw, norm, g_out):
        h = torch.tanh(lin(x))
        out = linear_cross_entropy(h, W, y, bias=b, token_weight=tw if weights else None,
                                   normalizer=norm if use_norm else None, **c)
        if c.get("return_lse"):
            loss, lse = out
            return loss + 0.01 * (lse * g_out).sum()
        return (out * g_out).sum() if c["reduction"] == "none" else out

    explain = torch._dynamo.explain(fwd)(x, y, tw, norm, g_out)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    params = (lin.weight, lin.bias, W, b)
    eager = fwd(x, y, tw, norm, g_out)
    eager.backward()
    g_eager = _grads(params)
    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")(x, y, tw, norm, g_out)
    compiled.backward()
    g_comp = _grads(params)
    _assert_close(compiled.detach(), eager.detach(), "loss")
    _assert_close(g_comp, g_eager, "grads")


def test_whole_step_with_backward_has_no_graph_break(setup):
    """With dynamo tracing ``backward()`` (``trace_autograd_ops``), forward + loss + backward is one graph."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace Tensor.backward()")
    lin, W, b, x, y, tw = setup

    def step(x, y, tw):
        loss = linear_cross_entropy(torch.tanh(lin(x)), W, y, bias=b, token_weight=tw, shift=True)
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explain = torch._dynamo.explain(step)(x, y, tw)
    assert explain.graph_break_count == 0, explain.break_reasons


def test_compiled_token_logprobs_no_grad_and_with_grad(setup):
    lin, W, b, x, y, _ = setup

    def profile(x, y):
        with torch.no_grad():
            return token_logprobs(torch.tanh(lin(x)), W, y, bias=b, return_entropy=True, return_lse=True)

    explain = torch._dynamo.explain(profile)(x, y)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    _assert_close(tuple(torch.compile(profile, fullgraph=True, backend="aot_eager")(x, y)), tuple(profile(x, y)),
                  "no_grad outputs")

    gs = [torch.randn(2, 7) for _ in range(3)]

    def pg_loss(x, y):  # policy-gradient style: arbitrary upstream gradients of every output
        out = token_logprobs(torch.tanh(lin(x)), W, y, bias=b, return_entropy=True, return_lse=True)
        return sum((o * g).sum() for o, g in zip(out, gs, strict=True))

    params = (lin.weight, lin.bias, W, b)
    pg_loss(x, y).backward()
    g_eager = _grads(params)
    torch.compile(pg_loss, fullgraph=True, backend="aot_eager")(x, y).backward()
    _assert_close(_grads(params), g_eager, "grads")


@pytest.mark.triton
def test_compiled_triton_impl_matches_eager(setup):
    from t3s_kernels._triton import triton_runs_on

    if not triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("Triton cannot run here")
    lin, W, b, x, y, tw = setup
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lin, W, b = lin.to(dev), torch.nn.Parameter(W.detach().to(dev)), torch.nn.Parameter(b.detach().to(dev))
    x, y, tw = x.to(dev), y.to(dev), tw.to(dev)

    def fwd(x, y, tw):
        return linear_cross_entropy(torch.tanh(lin(x)), W, y, bias=b, token_weight=tw, shift=True, impl="triton")

    params = (lin.weight, lin.bias, W, b)
    eager = fwd(x, y, tw)
    eager.backward()
    g_eager = _grads(params)
    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")(x, y, tw)
    compiled.backward()
    _assert_close(compiled.detach(), eager.detach(), "loss")
    _assert_close(_grads(params), g_eager, "grads")


def test_ops_pass_opcheck():
    from t3s_kernels.linear_ce import ops  # noqa: F401 - registers the ops

    torch.manual_seed(1)
    h = torch.randn(9, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    y = torch.randint(0, V, (9,))
    y[3] = -100
    torch.library.opcheck(torch.ops.t3s.token_stats.default, (h, w, bias, y, -100, None, 1.0, True, True, "reference"))
    torch.library.opcheck(
        torch.ops.t3s.lce_reduced.default,
        (h, w, bias, y, None, None, None, None, -100, "mean", 0.1, 0.0, None, 1.0, 0, "reference", "auto",
         None, None, "fp32", True, True, True),
    )


@pytest.mark.gpu
def test_compiled_step_on_cuda_has_no_host_sync():
    """Triton impl behind the ops on CUDA: same numbers as eager, and the compiled step never syncs."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).cuda()
    W = torch.nn.Parameter(torch.randn(1000, 64, device="cuda") / 8)
    x = torch.randn(4, 33, 64, device="cuda")
    y = torch.randint(0, 1000, (4, 33), device="cuda")
    tw = (torch.rand(4, 33, device="cuda") > 0.3).float()

    def fwd(x, y, tw):
        return linear_cross_entropy(torch.tanh(lin(x)), W, y, token_weight=tw, shift=True)

    eager = fwd(x, y, tw)
    eager.backward()
    g_eager = _grads((lin.weight, W))
    step = torch.compile(fwd, fullgraph=True)
    step(x, y, tw).backward()  # compile outside the sync check
    _grads((lin.weight, W))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(x, y, tw)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_close(loss.detach(), eager.detach(), "loss")
    _assert_close(_grads((lin.weight, W)), g_eager, "grads")
