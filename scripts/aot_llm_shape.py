"""AOT-compile, for sm_90a, the Triton launches the profiler's forward makes at an LLM shape.

``tests/kernels/_aot_compile.py`` compiles every kernel family at a small shape (N = 64, D = 64); the tile choice,
the vocabulary splits and the loop bounds of the fused forward depend on N and D, so this compiles the launches of
``score_batch``'s call, ``token_logprobs(hidden[:, :-1], W, y, return_entropy=True)`` under ``no_grad`` (hidden
``[1, N + 1, D]``, a strided view as the profiler passes it, no bias, no softcap) at N = 4096, D = 4096,
V = 151936, bf16, and prints one line per distinct launch in ``_aot_compile``'s format
(``REG``, ``STACK`` = spill bytes, ``SMEM``, ``WARPS``, ``STAGES``, ``CTAS/SM``). Nothing runs: the launches are
captured from the public call on CPU tensors (``torch.empty``: ~1.3 GB of host memory) and compiled. (The training
calls are not captured this way: their chunked path runs its cuBLAS GEMMs as torch ops, on the CPU here.)

Usage: ``python scripts/aot_llm_shape.py`` (without ``TRITON_INTERPRET``; repo root on ``PYTHONPATH``). Exit 1 on a
spill.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "kernels"))

N, D, V = 4096, 4096, 151936


def _profiler_call():
    import torch

    from t3s_kernels.linear_ce import token_logprobs

    hidden = torch.empty(1, N + 1, D, dtype=torch.bfloat16)
    w = torch.empty(V, D, dtype=torch.bfloat16)
    y = torch.zeros(1, N, dtype=torch.int64)
    with torch.no_grad():
        token_logprobs(hidden[:, :-1], w, y, return_entropy=True, impl="triton")


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    import _aot_compile as aot

    import t3s_kernels._triton as tt

    real_runs_on = tt.triton_runs_on
    tt.triton_runs_on = lambda device: True  # CPU tensors reach the Triton launchers; nothing is launched
    try:
        launches = aot._capture_launches(_profiler_call)
    finally:
        tt.triton_runs_on = real_runs_on
    bad, seen = 0, set()
    for fn, args, kwargs in launches:
        key = (fn.__name__, repr(sorted((k, aot._spec_key(v)) for k, v in kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        u = aot._compile_launch(fn, args, kwargs)
        print(f"{fn.__name__} profiler REG {u['REG']} STACK {u['STACK']} SMEM {u['SMEM']} WARPS {u['WARPS']} "
              f"STAGES {u['STAGES']} CTAS/SM {u['CTAS']}", flush=True)
        bad += u["STACK"] > 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
