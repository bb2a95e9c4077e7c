"""Compile Triton kernels for sm_90 exactly as the JIT would specialise them, without a GPU.

Run in a subprocess WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` returns interpreted
functions that the compiler cannot take): :func:`run_subprocess` does that for the tests. Catches what the
interpreter cannot: compiler-only errors, register spills and the resources of the shipped configs. Prints one line
per compiled kernel::

    name variant REG <regs/thread> STACK <bytes> SMEM <bytes> WARPS <n> STAGES <n> CTAS/SM <n>

(``CTAS/SM``: programs resident per H100/H200 SM from registers, shared memory and warps); exits 1 on a spill
(STACK > 0), non-zero on a compile error.

Kernel families (one job-list builder each, see ``FAMILIES``):

* ``lce``: every kernel the ``t3s_kernels.linear_ce`` launchers issue, captured from the public API itself
  (``token_logprobs`` / ``linear_cross_entropy`` forward and backward, fused and chunked backwards) run on CPU
  tensors with ``JITFunction.run`` intercepted: the captured arguments go through the JIT's own binder and
  ``_pack_args``, so unit strides become constants and 16-divisible ints / 16-byte-aligned pointers get the
  divisibility hints, as on a GPU (shapes: ``LCE_SHAPE``, every dimension a multiple of 16 like LLM shapes).
  Variants = dtypes (``bf16|fp16|fp32``, default ``bf16 fp32``).
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
SM90 = dict(regs=65536, smem=228 * 1024, smem_reserved=1024, max_warps=64, max_ctas=32)  # per SM, H100 / H200


def run_subprocess(family: str, *variants: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run this script for ``family`` in a fresh interpreter without ``TRITON_INTERPRET``, repo root importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), family, *variants], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def parse_report(stdout: str) -> list[dict]:
    """The report lines as dicts: name, variant, REG, STACK, SMEM, WARPS, STAGES, CTAS/SM."""
    rows = []
    for line in stdout.splitlines():
        f = line.split()
        if len(f) == 14 and f[2] == "REG":
            rows.append(dict(name=f[0], variant=f[1], **{f[i]: int(f[i + 1]) for i in range(2, 14, 2)}))
    return rows


def has_ptxas() -> bool:
    """Whether triton (importable) ships the NVIDIA toolchain the compile needs."""
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def ctas_per_sm(regs: int, smem: int, warps: int) -> int:
    """Resident programs per sm_90 SM: registers are allocated per warp in units of 256, shared memory plus 1 KB
    reserved per program."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM90["regs"] // max(1, per_warp * warps)
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    return min(by_regs, by_smem, SM90["max_warps"] // warps, SM90["max_ctas"])


def _usage(k) -> dict:
    cuobjdump = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    reg = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    smem = int(k.metadata.shared)
    warps, stages = int(k.metadata.num_warps), int(k.metadata.num_stages)
    return dict(REG=reg, STACK=stack, SMEM=smem, WARPS=warps, STAGES=stages, CTAS=ctas_per_sm(reg, smem, warps))


def _sm90():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    return target, make_backend(target)


def _compile(fn, types: dict, consts: dict, opts: dict, div16=()) -> dict:
    """Compile ``fn`` (a JITFunction) for sm_90 from a hand-written signature; ``types``: non-constexpr arg -> Triton
    type string, ``consts``: constexpr arg -> value (``None`` for a pointer passed as None), ``div16``: args the JIT
    would mark divisible by 16. Returns the resource usage (see :func:`_usage`)."""
    import triton
    from triton.compiler import ASTSource

    target, _ = _sm90()
    signature = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in div16}
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    return _usage(triton.compile(src, target=target, options=opts))


def _compile_launch(fn, args: tuple, kwargs: dict) -> dict:
    """Compile one captured launch ``fn[grid](*args, **kwargs)`` with the JIT's own specialisation for sm_90."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target, backend = _sm90()
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return _usage(triton.compile(src, target=target, options=options.__dict__))


# ---------------------------------------------------------------------------------------------------------------
# job lists: (label, compile thunk)

LCE_SHAPE = dict(N=64, V=151936, D=64)  # V of Qwen; N and D small (CPU matmuls), multiples of 16 like LLM shapes


def _capture_launches(calls):
    """Run ``calls()`` with every ``JITFunction.run`` recorded instead of launched: ``[(fn, args, kwargs)]``."""
    from triton.runtime.jit import JITFunction

    launches = []
    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        calls()
    finally:
        JITFunction.run = real
    return launches


def lce_jobs(name: str):
    import torch

    import t3s_kernels._triton as tt
    from t3s_kernels.linear_ce import linear_cross_entropy, token_logprobs

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    N, V, D = LCE_SHAPE["N"], LCE_SHAPE["V"], LCE_SHAPE["D"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype)
    W = (torch.randn(V, D, generator=g) * 0.1).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    tw = torch.rand(N, generator=g)

    def leaves():
        return h.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()

    def calls():
        kw = dict(bias=b, softcap=30.0, impl="triton")
        with torch.no_grad():  # the profiler's forward
            token_logprobs(h, W, y, return_entropy=True, **kw)
        for mode in ("kernel", "chunked"):  # fused strategy, both backwards, every upstream gradient
            os.environ["T3S_FUSED_BACKWARD"] = mode
            hh, ww, bb = leaves()
            out = token_logprobs(hh, ww, y, bias=bb, softcap=30.0, return_entropy=True, return_lse=True,
                                 impl="triton")
            (out.logprob.sum() + out.entropy.sum() + out.lse.sum()).backward()
        os.environ.pop("T3S_FUSED_BACKWARD")
        for strategy in ("fused", "chunked"):  # the trainers' reductions through both strategies
            for extra in (dict(), dict(token_weight=tw), dict(reduction="none")):
                hh, ww, bb = leaves()
                loss = linear_cross_entropy(hh, ww, y, bias=bb, softcap=30.0, label_smoothing=0.1, z_loss=1e-4,
                                            impl="triton", strategy=strategy, **extra)
                loss.sum().backward()

    real_runs_on = tt.triton_runs_on
    tt.triton_runs_on = lambda device: True  # CPU tensors reach the Triton launchers; nothing is launched
    try:
        launches = _capture_launches(calls)
    finally:
        tt.triton_runs_on = real_runs_on
    jobs, seen = [], set()
    for fn, args, kwargs in launches:
        key = (fn.__name__, repr(sorted((k, _spec_key(v)) for k, v in kwargs.items())))
        if key not in seen:
            seen.add(key)
            jobs.append((fn.__name__, name, lambda fn=fn, a=args, k=kwargs: _compile_launch(fn, a, k)))
    return jobs


def _spec_key(v):
    """What the JIT's specialisation depends on (dtype and alignment of tensors, value of scalars)."""
    if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
        return (str(v.dtype), v.data_ptr() % 16 == 0)
    return v if isinstance(v, (int, float, bool, str, type(None))) else str(v)


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
                     seed=scalar, rng_base=scalar, mask_id="i32", n_chunks="i32")
        consts = dict(tile, HAS_VALID=has_valid, HAS_TARGET=has_target, HAS_COMP=has_comp, ALIGNED=aligned)
        # a None pointer is a constexpr None for the JIT
        none = ([] if has_valid else ["valid_ptr"]) + ([] if has_target else ["target_ptr"])
        if not has_comp:
            none += ["wrc_ptr", "wtc_ptr", "noisy_c_ptr", "w_c_ptr", "code_c_ptr", "cnt_c_ptr"]
        consts.update(dict.fromkeys(none))
        div16 = [k for k, v in types.items() if v.startswith("*") and k not in consts] if ptr16 else []
        jobs.append((fn.__name__, f"{name}-{label}",  # launcher defaults: 4 warps, 3 stages
                     lambda t=types, c=consts, d=div16: _compile(fn, t, c, dict(num_warps=4, num_stages=3), d)))
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
        for fn_name, label, thunk in build(variant):
            u = thunk()
            print(f"{fn_name} {label} REG {u['REG']} STACK {u['STACK']} SMEM {u['SMEM']} WARPS {u['WARPS']} "
                  f"STAGES {u['STAGES']} CTAS/SM {u['CTAS']}", flush=True)
            bad += u["STACK"] > 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
