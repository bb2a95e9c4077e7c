"""Block-diffusion union mask: effective bandwidth of the Triton kernel vs the device's measured copy bandwidth.

GPU (default): 16K-token sequences (``--seq-len 16384``), batch ``--batch 1 8 64 256``, block 32, int64 and int32
ids, 15 % targets, per-block stratified t. Rows:

* ``copy``: ``dst.copy_(src)`` of a 1 GiB buffer: the bandwidth ceiling measured in the same run (read + write);
* ``kernel``: the Triton kernel alone (its host launcher with the per-block arrays prepared), effective bandwidth =
  bytes it must move (ids, maskable, valid, targets read; noisy ids, fp32 weight, uint8 code written; per-block
  t / weights / counts) / p50 time; ``bw_frac`` = that / copy bandwidth (target ≥ 0.70);
* ``api``: the whole public call (validation, t sampling, launch, per-document sums).

CPU smoke (``--cpu``, runs in CI): a small batch through the C++ op and the reference; no bandwidth target.

Examples::

    python -m bench union_mask                       # H100 / H200
    python -m bench union_mask --batch 64 --seq-len 16384
    python -m bench union_mask --cpu --no-save       # smoke
"""

from __future__ import annotations

import torch

from bench.common import append_rows, base_parser, format_table, guarded, stamp, time_ms

BENCH = "union_mask"


def copy_bandwidth_gbs(device, nbytes: int = 2**30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device=device)
    return 2 * nbytes / (t.p50 * 1e-3) / 1e9


def make_inputs(B: int, L: int, device, ids_dtype=torch.int64, rho: float = 0.15, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, 150000, (B, L), generator=g).to(device=device, dtype=ids_dtype)
    maskable = torch.ones(B, L, dtype=torch.bool)
    maskable[:, : L // 8] = False  # prompt
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[:, L - L // 16 :] = False  # pad tail
    targets = torch.rand(B, L, generator=g) < rho
    return ids, maskable.to(device), valid.to(device), targets.to(device)


def kernel_bytes(B: int, L: int, bs: int, id_bytes: int) -> int:
    T, NB = B * L, B * -(-L // bs)
    per_token = id_bytes + 3 + id_bytes + 4 + 1  # read ids, 3 masks; write noisy, weight, code
    per_block = 4 * 3 + 5 * 4  # p, w_rand, w_target; 5 int32 counts
    return T * per_token + NB * per_block


def kernel_only(ids, maskable, valid, targets, bs):
    """A zero-argument callable launching only the Triton kernel (per-block arrays prepared once)."""
    from t3s_kernels.block_diffusion.kernels import union_mask_triton

    B, L = ids.shape
    dev = ids.device
    flat = [x.reshape(-1).contiguous() for x in (ids, maskable, valid, targets)]
    doc_start = torch.arange(B, device=dev, dtype=torch.int64) * L
    doc_len = torch.full((B,), L, device=dev, dtype=torch.int64)
    nb = -(-L // bs)
    blk_ptr = torch.arange(B + 1, device=dev, dtype=torch.int64) * nb
    t = torch.rand(B * nb, device=dev) * 0.999 + 1e-3
    w = (1.0 / t, torch.ones_like(t))
    out = (torch.empty_like(flat[0]), torch.empty(B * L, device=dev), torch.empty(B * L, dtype=torch.uint8, device=dev),
           torch.empty(B * nb, 5, dtype=torch.int32, device=dev))  # fmt: skip

    def run():
        union_mask_triton(flat[0], flat[1], flat[2], flat[3], doc_start, doc_len, blk_ptr, nb, t, w, None, *out, None,
                          block_size=bs, mask_token_id=156895, seed=1234, rng_base=(7 << 32),
                          aligned=L % 16 == 0)  # fmt: skip

    return run


def bandwidth_row(cols: dict, fn, device, nbytes: int, copy_gbs: float) -> dict:
    """Time ``fn``; a row of ``cols`` + status, p20/p50/p80 ms, effective GB/s (``nbytes`` / p50) and ``bw_frac``."""
    t, status = guarded(lambda: time_ms(fn, device=device))
    row = {**cols, "status": status}
    if t is not None:
        gbs = nbytes / (t.p50 * 1e-3) / 1e9
        row.update(p20_ms=t.p20, p50_ms=t.p50, p80_ms=t.p80, gb_s=gbs, bw_frac=gbs / copy_gbs)
    return row


def main(argv: list[str] | None = None) -> int:
    p = base_parser(BENCH, __doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="CPU smoke mode (C++ op and reference)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--block-size", type=int, default=32)
    a = p.parse_args(argv)
    from t3s_kernels.block_diffusion import block_diffusion_union_mask

    cuda = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda" if cuda else "cpu")
    L = a.seq_len or (16384 if cuda else 2048)
    batches = a.batch or ([1, 8, 64, 256] if cuda else [2])
    bs = a.block_size
    base = {**stamp(device), "seq_len": L, "block_size": bs}
    rows = []
    if cuda:
        copy_gbs = copy_bandwidth_gbs(device)
        rows.append({**base, "case": "copy", "batch": "", "ids": "", "gb_s": copy_gbs, "status": "ok"})
        for B in batches:
            for ids_dtype in (torch.int64, torch.int32):
                inputs = make_inputs(B, L, device, ids_dtype)
                nbytes = kernel_bytes(B, L, bs, inputs[0].element_size())
                name = str(ids_dtype).replace("torch.", "")
                run = kernel_only(*inputs, bs)
                cols = {"batch": B, "ids": name, "tokens": B * L}
                rows.append(bandwidth_row({**base, "case": "kernel", **cols}, run, device, nbytes, copy_gbs))
                ids, maskable, valid, targets = inputs
                api = lambda ids=ids, maskable=maskable, targets=targets, valid=valid: block_diffusion_union_mask(  # noqa: E731
                    ids, maskable, targets=targets, valid=valid, block_size=bs, mask_token_id=156895, seed=1, step=2
                )
                rows.append(bandwidth_row({**base, "case": "api", **cols}, api, device, nbytes, copy_gbs))
                del inputs, run, ids, maskable, valid, targets
    else:
        for B in batches:
            ids, maskable, valid, targets = make_inputs(B, L, device)
            for impl in ("cpp", "reference"):
                fn = lambda impl=impl, ids=ids, maskable=maskable, targets=targets, valid=valid: (  # noqa: E731
                    block_diffusion_union_mask(ids, maskable, targets=targets, valid=valid, block_size=bs,
                                               mask_token_id=156895, impl=impl)
                )
                t, status = guarded(lambda fn=fn: time_ms(fn, device=device, budget_ms=300, max_rep=10))
                row = {**base, "case": impl, "batch": B, "ids": "int64", "tokens": B * L, "status": status}
                if t is not None:
                    row.update(p20_ms=t.p20, p50_ms=t.p50, p80_ms=t.p80)
                rows.append(row)
    cols = ["case", "batch", "ids", "tokens", "p50_ms", "gb_s", "bw_frac", "status"]
    print(format_table(rows, cols))
    if not a.no_save:
        print("appended to", append_rows(BENCH, rows, a.results_dir))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
