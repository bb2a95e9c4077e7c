"""The cost model's tracer counts what closed-form formulas say, at small shapes (CPU, no GPU, seconds).

What is checked: GEMM FLOPs of matmul-based code (forward and autograd backward), bytes of elementwise ops, the
live-memory peak of a known allocation pattern (gradients excluded on request), real values travelling with small
tensors (``.item()`` counted as a host sync, boolean indexing), Triton launches intercepted and priced by their
registered formula (an unregistered kernel is an error), and the library's own paths against ``k·N·D·V`` for
whatever kernels it launches. The formulas of the shipped kernels are checked against independent closed forms.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import cost_model  # noqa: E402
from bench._trace import KERNEL_FORMULAS, CostTracer, KernelCost, summarise  # noqa: E402

N, D, V = 96, 32, 200


def _traced(device="cuda", dtype=torch.float32, grad=True):
    tr = CostTracer(device)
    h = tr.tensor((N, D), dtype, requires_grad=grad)
    w = tr.tensor((V, D), dtype, requires_grad=grad)
    y = tr.real(torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0)))
    return tr, h, w, y


def test_matmul_forward_flops_and_bytes():
    tr, h, w, _ = _traced(grad=False)
    with tr:
        x = h @ w.t()
    assert isinstance(x, torch.Tensor) and x.device.type == "cuda" and tuple(x.shape) == (N, V)
    (mm,) = [r for r in tr.records if r.gemm_flops]
    assert mm.gemm_flops == 2 * N * D * V
    assert mm.bytes_read == (N * D + V * D) * 4 and mm.bytes_written == N * V * 4
    assert mm.gemm_mnk == (N, V, D)


def test_materialised_cross_entropy_fwd_bwd_is_three_gemms():
    tr, h, w, y = _traced()
    with tr:
        loss = F.cross_entropy(h @ w.t(), y)
        loss.backward()
    s = summarise(tr, (loss, h.grad, w.grad))
    assert s.gemm_flops == 6 * N * D * V
    assert tuple(h.grad.shape) == (N, D) and tuple(w.grad.shape) == (V, D)
    # the [N, V] logits and their gradient are the largest temporaries: at least two such buffers at the peak
    assert s.workspace_bytes >= 2 * N * V * 4


def test_elementwise_bytes_and_views_free():
    tr, h, _, _ = _traced(grad=False)
    with tr:
        a = h * 2.0  # read N·D, write N·D
        b = a.t()  # a view: no bytes
        c = b.contiguous()  # a copy
        a.add_(1.0)  # in place: read + write
        a.zero_()  # write only
    names = [r.name for r in tr.records]
    by = {r.name: r for r in tr.records}
    assert by["mul.Tensor"].bytes_read == N * D * 4 and by["mul.Tensor"].bytes_written == N * D * 4
    assert "t.default" not in names
    assert by["clone.default"].hbm_bytes == 2 * N * D * 4  # .contiguous() of a transposed view copies
    assert by["add_.Tensor"].bytes_read == N * D * 4 and by["add_.Tensor"].bytes_written == N * D * 4
    assert by["zero_.default"].bytes_read == 0 and by["zero_.default"].bytes_written == N * D * 4
    del c


def test_peak_live_bytes_of_a_known_pattern():
    M = 2**20  # elements; storages of a MiB and more are swept at every op
    tr = CostTracer("cuda")
    with tr:
        x = torch.empty(M, device="cuda")  # 4 MiB
        y = torch.empty(3 * M, device="cuda")  # 12 MiB: live 16 MiB
        del x
        z = torch.empty(2 * M, device="cuda")  # live 12 + 8 = 20 MiB
        del y
        out = torch.empty(M, device="cuda")  # live 8 + 4
    peak, _ = tr.peak_bytes()
    assert peak == 20 * M
    peak_wo_z, _ = tr.peak_bytes(exclude=(z,))
    assert peak_wo_z == 16 * M
    del out


def test_shadow_values_item_and_boolean_index():
    tr, h, _, y = _traced(grad=False)
    real_y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    with tr:
        mask = y < V // 2
        n = int(mask.sum())
        rows = h[mask]
    assert n == int((real_y < V // 2).sum())
    assert tuple(rows.shape) == (n, D)
    assert tr.syncs == [".item()", "boolean-mask indexing (index)"]


SYNCING_OPS = {
    ".item()": lambda y, h: y[0].item(),
    "bool(t)": lambda y, h: bool(y[0] > 0),
    "torch.equal": lambda y, h: torch.equal(y, y),
    ".tolist()": lambda y, h: y.tolist(),
    ".numpy()": lambda y, h: y.numpy(),
    ".cpu()": lambda y, h: y.cpu(),
    '.to("cpu")': lambda y, h: y.to("cpu"),
    "copy_ into a host tensor": lambda y, h: torch.empty(N, dtype=y.dtype).copy_(y),
    "nonzero": lambda y, h: torch.nonzero(y > 5),
    "argwhere": lambda y, h: torch.argwhere(y > 5),
    "masked_select": lambda y, h: torch.masked_select(y, y > 5),
    "boolean-mask indexing": lambda y, h: h[y > 5],
    "boolean-mask assignment": lambda y, h: h.__setitem__(y > 5, 0.0),
    "unique": lambda y, h: torch.unique(y),
    "repeat_interleave without output_size": lambda y, h: torch.repeat_interleave(y % 3),
}


@pytest.mark.parametrize("what", list(SYNCING_OPS))
def test_every_kind_of_host_sync_is_counted(what):
    """Each deliberately syncing op is counted, once."""
    tr, h, _, y = _traced(grad=False)
    with tr:
        SYNCING_OPS[what](y, h)
    assert tr.host_syncs == 1, f"{what}: counted as {tr.syncs}, expected one host sync"


def test_sync_free_ops_count_no_sync():
    """Device-side counterparts of the syncing ops, and a host-to-device upload, count none."""
    tr, h, _, y = _traced(grad=False)
    with tr:
        mask = y > 5
        h.masked_fill(mask[:, None], 0.0)  # same shape: no host read
        torch.where(mask, y, -1)
        torch.repeat_interleave(y % 3, output_size=int(N * 2 + 1) - N - 1)  # the size is a host value here
        torch.arange(N).to("cuda")  # the batch's upload
        mask.sum()  # a device scalar, never read
    assert tr.syncs == [], tr.syncs


def test_item_of_an_unknown_value_is_an_error():
    tr, h, _, _ = _traced(grad=False)
    with tr, pytest.raises(RuntimeError, match="host read"):
        float(h.sum())


def test_triton_launch_is_recorded_by_formula_and_unknown_kernels_fail():
    from t3s_kernels._triton import tl, triton

    @triton.jit
    def _probe_kernel(x, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x + o, 0.0, mask=o < n)

    tr = CostTracer("cuda")
    x = tr.tensor((1000,), torch.float32)
    KERNEL_FORMULAS["_probe_kernel"] = lambda L: KernelCost(0.0, 4.0 * int(L.args["n"]), L.grid[0], "n writes")
    try:
        with tr, tr.triton_launches():
            _probe_kernel[lambda m: (triton.cdiv(1000, m["BLOCK"]),)](x, 1000, BLOCK=128)
        (rec,) = tr.records
        assert rec.kind == "triton" and rec.ctas == 8 and rec.hbm_bytes == 4000
    finally:
        del KERNEL_FORMULAS["_probe_kernel"]
    with tr, tr.triton_launches(), pytest.raises(KeyError, match="no formula"):
        _probe_kernel[(1,)](x, 1000, BLOCK=128)


def test_event_time_is_a_roofline():
    from bench._trace import OpRecord

    gpu = cost_model.GPUS["h100"]
    big = OpRecord("aten", "mm", gemm_flops=2 * 4096**3, dtype="bfloat16", gemm_mnk=(4096, 4096, 4096))
    expect = 2 * 4096**3 / (gpu.bf16_tflops * 1e12 * gpu.gemm_eff) * 1e3 + gpu.launch_us * 1e-3
    assert cost_model.event_ms(big, gpu) == pytest.approx(expect)
    copy = OpRecord("aten", "copy", bytes_read=1e9, bytes_written=1e9)
    assert cost_model.event_ms(copy, gpu) == pytest.approx(2e9 / (gpu.hbm_tbs * 1e12 * gpu.hbm_eff) * 1e3 + 4e-3)
    assert gpu.hbm_eff == 0.75  # issue 25: not 0.85
    assert cost_model.event_ms(OpRecord("aten", "empty.memory_format"), gpu) == 0.0  # allocation: no launch
    # a kernel re-reading its operands from L2 more than its FLOPs take is bound by L2
    l2 = OpRecord("triton", "k", gemm_flops=1e9, dtype="bfloat16", ctas=132, l2_bytes=1e11)
    assert cost_model.event_ms(l2, gpu) == pytest.approx(1e11 / (gpu.l2_tbs * 1e12) * 1e3 + 4e-3)
    # a cuBLAS GEMM's L2 traffic from its tiles: 128x256 CTA tiles, the shared operand multicast to 2 CTAs
    assert cost_model.l2_bytes(big) == 2 * 4096 * (4096 * 16 + 4096 * 32 / 2)


@pytest.mark.parametrize("path", list(cost_model.PATHS))
def test_library_paths_trace_at_small_shapes(path):
    """Every path runs under the tracer with the GPU dispatch; FLOPs between the skipped-row minimum and 10·NDV."""
    s = cost_model.trace_path(path, 256, 64, 1024, dtype=torch.bfloat16)
    ndv = 256 * 64 * 1024
    floor = cost_model.PATHS[path].floor_ndv
    low = floor * (0.5 if path == "w50" else 1.0) * 0.4  # w50 may skip half; tile padding only adds
    assert low * ndv <= s.gemm_flops <= 10.5 * ndv, s.gemm_flops / ndv
    assert s.launches > 0
    row = cost_model.predict(path, 256, 64, 1024, cost_model.GPUS, s)
    # same compute, less HBM bandwidth: the H100 is never predicted faster, and memory-bound events make it slower
    assert row["h100_ms"] >= row["h200_ms"] > 0
    if any(r.hbm_bytes and not r.gemm_flops for r in s.records):
        assert row["h100_ms"] > row["h200_ms"]


def test_shipped_kernel_formulas_match_closed_forms():
    """Each registered formula of a kernel the library launches, at a tile-aligned shape, against its closed form."""
    from bench._trace import Launch

    t_h = torch.empty(1, dtype=torch.bfloat16, device="meta")
    n_act = CostTracer("cuda").real(torch.tensor([512], dtype=torch.int32))
    fwd = KERNEL_FORMULAS["_lce_stats_fwd_kernel"]
    tiles = dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, h=t_h, n_active=n_act)
    # one split, D = 4096: 132 resident 1 MiB h blocks exceed half of L2, so h is re-read per V tile
    c = fwd(Launch("_lce_stats_fwd_kernel", (8,), dict(tiles, N=1024, V=8192, D=4096)))
    assert c.dot_flops == 2 * 512 * 8192 * 4096 and c.ctas == 4
    assert c.hbm_bytes == (512 * 4096 * 2) * (8192 // 64) + 8192 * 4096 * 2 + 1024 * 16
    # 8 vocabulary splits: 16 resident blocks fit in L2, h is read once per row block; W once per wave of 132
    part = torch.empty(1, device="meta")
    c = fwd(Launch("_lce_stats_fwd_kernel", (64,), dict(tiles, N=1024, V=8192, D=4096, n_splits=8, part=part)))
    assert c.dot_flops == 2 * 512 * 8192 * 4096 and c.ctas == 32
    assert c.hbm_bytes == 512 * 4096 * 2 + 8192 * 4096 * 2 + 5 * 8 * 512 * 4
    # row kernel of a stored chunk: two reads of each fp32 row and one bf16 dx write
    x, dx = torch.empty(1, device="meta"), torch.empty(1, dtype=torch.bfloat16, device="meta")
    c = KERNEL_FORMULAS["_lce_chunk_row_kernel"](Launch("_lce_chunk_row_kernel", (300,), dict(V=1000, x=x, dx=dx,
                                                                                            y=None)))
    assert c.dot_flops == 0 and c.hbm_bytes == 300 * 1000 * (2 * 4 + 2)
    # a statistics-only launch (no dx) makes one pass over the row: read once, nothing written
    stats_only = dict(V=1000, x=x, dx=x, y=None, COMPUTE_STATS=True, WRITE_DX=False)
    c = KERNEL_FORMULAS["_lce_chunk_row_kernel"](Launch("_lce_chunk_row_kernel", (300,), stats_only))
    assert c.hbm_bytes == 300 * 1000 * 4
    # L2 bytes: every (row block, V tile) pair loads its h block and W tile
    c = fwd(Launch("_lce_stats_fwd_kernel", (8,), dict(tiles, N=1024, V=8192, D=4096)))
    assert c.l2_bytes == 4 * (8192 // 64) * (128 + 64) * 4096 * 2
    for name in KERNEL_FORMULAS:
        if name.startswith("_lce"):
            assert cost_model.__doc__ and name in cost_model.__doc__, f"formula of {name} is not documented"
