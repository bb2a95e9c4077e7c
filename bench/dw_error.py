"""Error of the LM-head weight gradient under each mode of the dW contract, against an fp64 oracle (CPU).

``python -m bench.dw_error [--n N] [--d D] [--v V] [--chunks K]`` runs ``linear_cross_entropy`` (sum reduction,
bf16 inputs; ``--chunks`` super-chunks through ``workspace_bytes``, as on a GPU at N = 32768 with the default
budget) and prints the relative Frobenius error ``‖dW − dW₆₄‖ / ‖dW₆₄‖`` of

* bf16 weights, ``weight_grad_accumulation="weight_dtype"`` (the default: rounded to bf16 once per super-chunk);
* bf16 weights, ``"fp32"`` (opt-in: fp32 accumulator, rounded to bf16 once);
* fp32 master weights under a bf16 compute (``compute_dtype=torch.bfloat16``: the exact fp32 sum is returned).

The oracle differentiates the same loss in fp64 at the bf16 values the GEMMs read, in row blocks.
"""

from __future__ import annotations

import argparse

import torch

from t3s_kernels import linear_cross_entropy


def oracle_dw(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, block: int = 512) -> torch.Tensor:
    """fp64 ``d/dW Σ_i CE(h_i W^T, y_i)`` = ``Σ_i (softmax(z_i) − e_{y_i}) h_iᵀ``, ``block`` rows at a time."""
    W64 = W.double()
    dW = torch.zeros_like(W64)
    for r0 in range(0, h.shape[0], block):
        h64 = h[r0:r0 + block].double()
        p = torch.softmax(h64 @ W64.t(), dim=-1)
        p[torch.arange(p.shape[0]), y[r0:r0 + block]] -= 1.0
        dW += p.t() @ h64
    return dW


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def measure(N: int, D: int, V: int, chunks: int, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).bfloat16()
    W32 = torch.randn(V, D, generator=g) * (2.0 / D**0.5)
    y = torch.randint(0, V, (N,), generator=g)
    Wb = W32.bfloat16()
    ref = oracle_dw(h, Wb, y)
    budget = -(-N // chunks) * V * 4  # CPU fp32 super-chunk rows: N / chunks
    out = {}
    for name, weight, kw in (
        ("bf16 weights, weight_dtype (default)", Wb, dict(weight_grad_accumulation="weight_dtype")),
        ("bf16 weights, fp32 (opt-in)", Wb, dict(weight_grad_accumulation="fp32")),
        ("fp32 master weights, bf16 compute", Wb.float(), dict(compute_dtype=torch.bfloat16)),
    ):
        w = weight.clone().requires_grad_()
        linear_cross_entropy(h, w, y, reduction="sum", workspace_bytes=budget, **kw).backward()
        out[name] = rel_fro(w.grad, ref)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--chunks", type=int, default=25, help="super-chunks (25 = N 32768 on a GPU, default budget)")
    a = p.parse_args(argv)
    print(f"N={a.n} D={a.d} V={a.v} super-chunks={a.chunks}: relative Frobenius error of dW vs fp64")
    for name, err in measure(a.n, a.d, a.v, a.chunks).items():
        print(f"  {name:40s} {err:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
