"""CPU path of the union mask: the C++ op in ``csrc/union_mask.cpp``, built on first use.

``load_union_mask_op()`` compiles the single source file with :func:`torch.utils.cpp_extension.load` (cached in
torch's extension directory, ``TORCH_EXTENSIONS_DIR``; later processes only load the shared object) and returns
``torch.ops.t3s.union_mask``. When the source cannot be found (a non-editable install does not ship ``csrc/``),
no compiler is available, or ``T3S_NO_CPP=1`` is set, it returns ``None`` after a one-line warning and callers run
the pure-PyTorch reference instead — same masks, only slower.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["csrc_path", "load_union_mask_op"]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def csrc_path() -> Path:
    """The C++ source: ``<repo>/csrc/union_mask.cpp`` (editable install / source checkout), or a copy shipped as
    package data at ``t3s_kernels/csrc/union_mask.cpp``; the first that exists (else the repo path)."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "csrc" / "union_mask.cpp", here.parents[1] / "csrc" / "union_mask.cpp"]
    return next((c for c in candidates if c.is_file()), candidates[0])


def load_union_mask_op():
    """The compiled ``torch.ops.t3s.union_mask`` op, or ``None`` (with a one-line warning) when unavailable."""
    with _LOCK:
        if "op" in _STATE:
            return _STATE["op"]
        op, why = None, None
        src = csrc_path()
        if os.environ.get("T3S_NO_CPP", "0") == "1":
            why = "T3S_NO_CPP=1"
        elif not src.is_file():
            why = f"{src} not found (non-editable install)"
        else:
            try:
                if not hasattr(torch.ops.t3s, "union_mask"):
                    from torch.utils.cpp_extension import load

                    load(
                        name="t3s_union_mask",
                        sources=[str(src)],
                        extra_cflags=["-O3"],
                        is_python_module=False,
                        verbose=False,
                    )
                op = torch.ops.t3s.union_mask
            except Exception as e:  # no compiler, no ninja, no headers ...
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if op is None:
            warnings.warn(
                f"t3s_kernels: C++ union-mask op unavailable ({why}); using the pure-PyTorch reference",
                RuntimeWarning,
                stacklevel=3,
            )
        _STATE["op"] = op
        return op
