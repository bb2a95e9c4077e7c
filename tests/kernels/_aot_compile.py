"""Compile Triton kernels with their shipped launch configs for sm_90, without a GPU.

Run in a subprocess WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` returns interpreted
functions that the compiler cannot take): :func:`run_subprocess` does that for the tests. Catches what the
interpreter cannot: compiler-only errors and register spills of the shipped configs. Prints one line per kernel:
``name variant REG <n> STACK <bytes>``; exits 1 on a spill (STACK > 0), non-zero on a compile error.

Kernel families (one job-list builder each, see ``FAMILIES``):

* ``lce``: every ``t3s_kernels.linear_ce`` kernel with its shipped tile config; variants = dtypes
  (``bf16|fp16|fp32``, default ``bf16 fp32``).
* ``union_mask``: ``t3s_kernels.block_diffusion`` union-mask kernel, the launcher's constexpr flag combinations;
  variants = input id dtypes (``int64|int32``, default both).

Usage: ``python tests/kernels/_aot_compile.py FAMILY [variant ...]``

Importing this module is cheap (no triton / kernel import): the tests import it for :func:`run_subprocess`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_subprocess(family: str, *variants: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run this script for ``family`` in a fresh interpreter without ``TRITON_INTERPRET``, repo root importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), family, *variants], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def has_ptxas() -> bool:
    """Whether triton (importable) ships the NVIDIA toolchain the compile needs."""
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def _compile(fn, types: dict, consts: dict, opts: dict, div16=()) -> tuple[int, int]:
    """Compile ``fn`` (a JITFunction) for sm_90; ``types``: non-constexpr arg -> Triton type string, ``consts``:
    constexpr arg -> value (``None`` for a pointer passed as None), ``div16``: args the JIT would mark divisible by 16
    (pointers of 16-byte-aligned tensors). Returns (registers, stack bytes) per thread."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in div16}
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    reg = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return reg, stack


# ---------------------------------------------------------------------------------------------------------------
# job lists: (label, fn, types, consts, opts, div16)


def lce_jobs(name: str):
    import torch

    import t3s_kernels.linear_ce.kernels as K

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
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
    row = dict(x="*fp32", dx=p, b=p, y="*i64", stride_xn="i64", stride_dxn="i64", V="i32", softcap="fp32",
               inv_temp="fp32")
    row_g = dict(lse="*fp32", ent="*fp32", nll="*fp32", smooth="*fp32", g_lse="*fp32", g_tgt="*fp32",
                 g_sumz="*fp32", g_ent="*fp32", g_lse2="*fp32")
    jobs.append((K._lce_chunk_row_kernel,
                 dict(row, **row_g),
                 dict(flags, COMPUTE_STATS=True, WANT_SMOOTH=True, WANT_ENTROPY=True, WRITE_DX=True,
                      HAS_G_SUMZ=True, HAS_G_ENT=True, HAS_G_LSE2=True, BLOCK_V=8192), dict(num_warps=16)))
    return [(name, fn, types, consts, opts, ()) for fn, types, consts, opts in jobs]


# union-mask launch shapes of ``union_mask_triton``: (label, HAS_VALID, HAS_TARGET, HAS_COMP, ALIGNED, scalar type,
# 16-byte-aligned pointers). The JIT types the do_not_specialize ints (seed, rng_base, mask_id) by value: i32 when
# they fit (seed < 2**31, step == 0), i64 otherwise (any step > 0 makes rng_base = step * 2**32 + offset an i64);
# it marks the pointers of 16-byte-aligned tensors (fresh allocations) divisible by 16, not those of offset views.
UNION_MASK_VARIANTS = [
    ("all_on", True, True, True, False, "i64", True),  # packed (cu_seqlens) input, valid + targets + complementary
    ("all_off", False, False, False, False, "i32", False),  # maskable only, seed / step 0, unaligned views
    ("aligned", True, True, True, True, "i64", True),  # padded [B, L] with L % 16 == 0
]
UNION_MASK_BLOCK_SIZE = 32  # LLaDA2.0


def union_mask_jobs(name: str):
    import t3s_kernels.block_diffusion.kernels as K

    ids = {"int64": "*i64", "int32": "*i32"}[name]
    fn = K._union_mask_fwd_kernel.fn  # under @triton.heuristics
    # the launcher's tile: NBLK blocks of BS_P2 tokens, NBLK = min(next_pow2(max_blocks), 1024 // BS_P2)
    bs_p2 = K._next_pow2(UNION_MASK_BLOCK_SIZE)
    tile = dict(BS=UNION_MASK_BLOCK_SIZE, BS_P2=bs_p2, NBLK=max(1, 1024 // bs_p2))
    jobs = []
    for label, has_valid, has_target, has_comp, aligned, scalar, ptr16 in UNION_MASK_VARIANTS:
        types = dict(ids_ptr=ids, maskable_ptr="*u8", valid_ptr="*u8", target_ptr="*u8", doc_start_ptr="*i64",
                     doc_len_ptr="*i64", blk_ptr_ptr="*i64", p_ptr="*fp32", wr_ptr="*fp32", wt_ptr="*fp32",
                     wrc_ptr="*fp32", wtc_ptr="*fp32", noisy_ptr=ids, w_ptr="*fp32", code_ptr="*u8",
                     cnt_ptr="*i32", noisy_c_ptr=ids, w_c_ptr="*fp32", code_c_ptr="*u8", cnt_c_ptr="*i32",
                     seed=scalar, rng_base=scalar, mask_id="i32")
        consts = dict(tile, HAS_VALID=has_valid, HAS_TARGET=has_target, HAS_COMP=has_comp, ALIGNED=aligned)
        # a None pointer is a constexpr None for the JIT
        none = ([] if has_valid else ["valid_ptr"]) + ([] if has_target else ["target_ptr"])
        if not has_comp:
            none += ["wrc_ptr", "wtc_ptr", "noisy_c_ptr", "w_c_ptr", "code_c_ptr", "cnt_c_ptr"]
        consts.update(dict.fromkeys(none))
        div16 = [k for k, v in types.items() if v.startswith("*") and k not in consts] if ptr16 else []
        jobs.append((f"{name}-{label}", fn, types, consts, dict(num_warps=4, num_stages=3), div16))  # launcher defaults
    return jobs


FAMILIES = {"lce": (lce_jobs, ["bf16", "fp32"]), "union_mask": (union_mask_jobs, ["int64", "int32"])}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in FAMILIES:
        print(f"usage: {Path(__file__).name} {{{'|'.join(FAMILIES)}}} [variant ...]", file=sys.stderr)
        return 2
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    build, default = FAMILIES[argv[0]]
    bad = 0
    for variant in argv[1:] or default:
        for label, fn, types, consts, opts, div16 in build(variant):
            reg, stack = _compile(fn, types, consts, opts, div16)
            print(f"{fn.__name__} {label} REG {reg} STACK {stack}", flush=True)
            bad += stack > 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
