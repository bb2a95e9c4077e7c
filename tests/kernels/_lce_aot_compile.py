"""Compile every linear_ce Triton kernel with its shipped config for sm_90, without a GPU.

Run in a subprocess WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` returns interpreted
functions that the compiler cannot take). Catches what the interpreter cannot: compiler-only errors and register
spills of the shipped tile configs. Prints one line per kernel: ``name dtype REG <n> STACK <bytes>``; exits 1 on
a spill (STACK > 0).

Usage: ``python tests/kernels/_lce_aot_compile.py [bf16|fp16|fp32 ...]``
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import t3s_kernels.linear_ce.kernels as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _compile(fn, types: dict, consts: dict, opts: dict) -> tuple[int, int]:
    signature = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    k = triton.compile(ASTSource(fn, signature, constexprs=consts), target=TARGET, options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    reg = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return reg, stack


def main(names: list[str]) -> int:
    bad = 0
    for name in names:
        dtype = DTYPES[name]
        p = "*" + name
        prec = K._dot_precision(dtype)
        base = dict(h=p, w=p, b=p, y="*i64", row_order="*i64", n_active="*i32", N="i32", V="i32", D="i32",
                    stride_hn="i64", stride_hd="i64", stride_wv="i64", stride_wd="i64", ignore_index="i32",
                    softcap="fp32", inv_temp="fp32")
        g = dict(lse="*fp32", ent="*fp32", g_lse="*fp32", g_tgt="*fp32", g_sumz="*fp32", g_ent="*fp32")
        flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True)
        g_flags = dict(HAS_G_LSE=True, HAS_G_TGT=True, HAS_G_SUMZ=True, HAS_G_ENT=True)

        def cfg(kind):
            c = K._tile_config(kind, dtype)
            return ({k: c[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")},
                    dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))

        c, o = cfg("fwd")
        jobs = [
            (K._lce_stats_fwd_kernel, dict(base, lse="*fp32", tgt="*fp32", sumz="*fp32", ent="*fp32"),
             dict(flags, RETURN_SUMZ=True, RETURN_ENTROPY=True, UPCAST=False, DOT_PRECISION=prec, **c), o),
        ]
        c, o = cfg("dh")
        jobs.append((K._lce_bwd_dh_kernel, dict(base, **g, dh="*fp32", stride_dhn="i64"),
                     dict(flags, **g_flags, UPCAST=False, DOT_PRECISION=prec, **c), o))
        c, o = cfg("dw")
        jobs.append((K._lce_bwd_dw_kernel, dict(base, **g, dw="*fp32", db="*fp32", stride_dwv="i64"),
                     dict(flags, **g_flags, NEED_DW=True, NEED_DB=True, UPCAST=False, DOT_PRECISION=prec, **c), o))
        row = dict(x="*fp32", dx=p, b=p, y="*i64", stride_xn="i64", stride_dxn="i64", V="i32", ignore_index="i32",
                   softcap="fp32", inv_temp="fp32")
        jobs.append((K._lce_chunk_row_kernel,
                     dict(row, coef="*fp32", lse="*fp32", loss="*fp32", eps="fp32", z_loss="fp32"),
                     dict(flags, HAS_SMOOTHING=True, BLOCK_V=8192), dict(num_warps=16)))
        jobs.append((K._lce_chunk_bwd_row_kernel, dict(row, **{k: v for k, v in g.items() if k.startswith("g_")}),
                     dict(flags, **g_flags, BLOCK_V=8192), dict(num_warps=16)))
        for fn, types, consts, opts in jobs:
            reg, stack = _compile(fn, types, consts, opts)
            print(f"{fn.__name__} {name} REG {reg} STACK {stack}", flush=True)
            bad += stack > 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["bf16", "fp32"]))
