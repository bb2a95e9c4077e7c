"""Micro-benchmarks as repeated timings (pytest-benchmark): the CPU paths users run and the host cost of calls.

Not collected by the default ``pytest`` run (``testpaths = ["tests"]``). Run, save and compare with the last
saved run (files under ``bench/results/pytest-benchmark/<machine>/``; the first run only saves)::

    PYTHONPATH=$PWD python -m pytest bench/test_micro.py --benchmark-autosave --benchmark-compare \
        --benchmark-storage=bench/results/pytest-benchmark

CI runs every benchmark once with ``--benchmark-disable`` (``tests/test_bench_micro_smoke.py``): it checks that they
run and that what they return is right (against materialised logits, the union-mask definition), never how fast. What is timed (CPU, sizes in each test's name):

* ``reference_*``: the pure-PyTorch chunked reference behind ``impl="auto"`` on CPU — ``token_logprobs`` under
  ``no_grad`` (the profiler's call) and ``linear_cross_entropy`` forward + backward (training on CPU).
* ``union_mask_*``: ``block_diffusion_union_mask`` on CPU: the C++ op (built once, untimed) and the reference.
* ``select_*``: ``select_tokens`` over a synthetic Δc store (T3S rule and a fraction-matched baseline).
* ``host_*``: the Python cost of one call, without the kernel: validation + dispatch of ``token_logprobs`` on a
  1-token input, and the Triton launch wrapper ``lce_stats_fwd`` (argument packing, output allocation, grid) with
  the kernel launch itself replaced by a no-op. On a GPU this overhead is what a small call pays on top of the
  kernel; it is what CUDA-graph capture removes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def head():
    g = torch.Generator().manual_seed(0)
    N, D, V = 512, 64, 4096
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def test_reference_token_logprobs_no_grad_n512_d64_v4096(benchmark, head):
    from t3s_kernels import token_logprobs

    h, w, y = head

    def run():
        with torch.no_grad():
            return token_logprobs(h, w, y, return_entropy=True, impl="reference")

    out = benchmark(run)
    logp = torch.log_softmax(h.double() @ w.double().t(), -1)
    torch.testing.assert_close(out.logprob.double(), logp.gather(1, y[:, None])[:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(out.entropy.double(), -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-4)


def test_reference_linear_ce_fwd_bwd_n512_d64_v4096(benchmark, head):
    from t3s_kernels import linear_cross_entropy

    h, w, y = head
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    tw = (torch.arange(y.numel()) % 3 != 0).float()

    def run():
        hh.grad = ww.grad = None
        loss = linear_cross_entropy(hh, ww, y, token_weight=tw, impl="reference")
        loss.backward()
        return loss

    loss = benchmark(run)
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(h64 @ w64.t(), y, reduction="none")
    want = (ce * tw.double()).sum() / tw.sum()
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(hh.grad.double(), h64.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_union_mask_b4_l1024(benchmark, impl):
    from t3s_kernels import block_diffusion_union_mask

    if impl == "cpp":
        from t3s_kernels.block_diffusion.cpu import load_union_mask_op

        if load_union_mask_op() is None:  # built (or loaded from torch's cache) here, outside the timing
            pytest.skip("C++ union-mask op unavailable")
    g = torch.Generator().manual_seed(0)
    B, L = 4, 1024
    ids = torch.randint(5, 1000, (B, L), generator=g)
    maskable = torch.zeros(B, L, dtype=torch.bool)
    maskable[:, 128:] = True
    targets = (torch.rand(B, L, generator=g) < 0.05) & maskable

    def run():
        return block_diffusion_union_mask(ids, maskable, block_size=32, mask_token_id=1, targets=targets, seed=3,
                                          impl=impl)

    out = benchmark(run)
    masked = out.noisy_ids == 1  # the definition: m' = m ∨ (target ∧ maskable), clean ids elsewhere
    assert torch.equal(out.noisy_ids, torch.where(masked, torch.ones_like(ids), ids))
    assert not (masked & ~maskable).any() and not (targets & ~masked).any()
    assert torch.equal(out.loss_weight > 0, masked)


@pytest.fixture(scope="module")
def delta_store():
    from t3s.profile import Store

    rng = np.random.default_rng(0)
    rows = []
    for i in range(128):
        n = 256
        base = -rng.exponential(1.0, n).astype(np.float32)
        delta = rng.normal(0.0, 0.3, n).astype(np.float32)
        tok = rng.integers(5, 30000, n).tolist()
        rows.append({"index": i, "id": f"e{i}", "input_ids": [1, *tok], "response_start": 1,
                     "positions": list(range(1, n + 1)), "token_ids": tok, "logprob_base": base.tolist(),
                     "logprob_bottleneck": (base + delta).tolist(), "delta_c": delta.tolist()})
    return Store(path=None, table=pa.Table.from_pylist(rows), provenance={"eos_token_ids": [2]})


@pytest.mark.parametrize("rule", ["t3s", "static_high_conf"])
def test_select_128x256_tokens(benchmark, delta_store, rule):
    from t3s.select import select_tokens

    sel = benchmark(select_tokens, delta_store, rule=rule)
    assert len(sel) == 128 and sel.ids == [f"e{i}" for i in range(128)]
    assert all(np.array_equal(p, np.arange(1, 257)) for p in sel.positions)
    w = np.concatenate(sel.weights)
    assert set(np.unique(w).tolist()) <= {0.0, 1.0}
    assert 0 < (w == 0).mean() < 1 and np.isclose((w == 0).mean(), sel.stats["selected_fraction"])


def test_host_token_logprobs_dispatch_one_token(benchmark):
    from t3s_kernels import token_logprobs

    h, w, y = torch.randn(1, 8), torch.randn(16, 8), torch.tensor([3])

    def run():
        with torch.no_grad():
            return token_logprobs(h, w, y, impl="reference")

    out = benchmark(run)
    want = torch.log_softmax(h.double() @ w.double().t(), -1)[0, 3]
    torch.testing.assert_close(out.logprob.double(), want.reshape(1), rtol=0, atol=1e-5)


def test_host_triton_launch_wrapper_without_launch(benchmark, monkeypatch):
    pytest.importorskip("triton")
    from t3s_kernels.linear_ce import kernels
    from t3s_kernels.linear_ce.function import StatsOptions

    launched = []

    def no_launch(kind, kernel, tuned, grid_fn, args, dtype):
        launched.append(grid_fn(kernels._tile_config(kind, dtype)))

    monkeypatch.setattr(kernels, "_launch", no_launch)
    h, w, y = torch.randn(64, 32), torch.randn(128, 32), torch.randint(0, 128, (64,))
    opts = StatsOptions(want_entropy=True)

    def run():
        order, n_active = kernels.active_rows(y, opts.ignore_index)
        return kernels.lce_stats_fwd(h, w, None, y, order, n_active, opts)

    benchmark(run)
    assert launched and launched[-1] >= 1
