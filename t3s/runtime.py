"""What decides a run's numbers besides its config: thread counts, deterministic kernels, seeds, versions.

On CPU, a float reduction's result depends on how it is split across threads; MKL and OpenMP may change the
split with the machine's load when dynamic threading is on, and torch's default thread count is the core
count. :func:`pin_threading_env` (called by the ``t3s`` command before torch is imported) turns dynamic
threading off. A float result also depends on the instruction set each library dispatches to (PyTorch's own
kernels, MKL and oneDNN pick AVX-512 on a CPU that has it, AVX2 on one that does not);
:func:`pin_portable_env` (``runtime.portable``, also set before torch is imported) pins all three to AVX2, a
level every current x86-64 server CPU has, so one run gives the same bytes on any of them. :func:`apply_runtime`
pins the thread counts from ``runtime.*``, turns on deterministic algorithms and seeds every RNG;
:func:`provenance` records all of it with the library versions and the BLAS in the run directory
(``provenance.json``) and the report.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import re
import sys
import warnings
from typing import Any

# Set before torch (and with it OpenMP / MKL) initialises; setdefault keeps a user's explicit choice.
THREADING_ENV = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


# Every instruction-set choice found to change float results on x86-64, pinned to AVX2. Each library reads its
# variable once, when it first dispatches, so they must be set before torch runs anything (t3s.cli sets them
# before importing torch). MKL_CBWR's STRICT mode also pins MKL's blocking, not only its code path.
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels (softmax, norms, Adam, SDPA, ...)
    "MKL_CBWR": "AVX2,STRICT",  # MKL's GEMMs: conditional numerical reproducibility on the AVX2 code path
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels
}
_MKL_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
                 10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}
_MKL_STRICT = 0x10000


def pin_portable_env() -> bool:
    """Set :data:`PORTABLE_ENV`, overriding any other level; False when torch was already imported, so some
    library may have dispatched already (:func:`portable_state` says what is in force)."""
    os.environ.update(PORTABLE_ENV)
    return "torch" not in sys.modules


def portable_env_missing() -> dict[str, str | None]:
    """The portable pins this process's environment does not have: ``{name: current value}``."""
    return {k: os.environ.get(k) for k, v in PORTABLE_ENV.items() if os.environ.get(k) != v}


def _mkl_cbwr_branch() -> str | None:
    """MKL's conditional-numerical-reproducibility branch as MKL itself reports it (None without MKL)."""
    import ctypes

    import torch

    lib_path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        get = ctypes.CDLL(lib_path).mkl_serv_cbwr_get  # MKL is linked into torch statically
    except (OSError, AttributeError):
        return None
    branch = get(-1)  # MKL_CBWR_ALL: the branch and the STRICT flag
    name = _MKL_BRANCHES.get(branch & ~_MKL_STRICT, str(branch & ~_MKL_STRICT))
    return name + (",STRICT" if branch & _MKL_STRICT else "")


def portable_state() -> dict:
    """Which instruction-set pins are in force in this process, read back from torch and MKL where they say."""
    import torch

    aten = torch.backends.cpu.get_cpu_capability()
    mkl = _mkl_cbwr_branch() if torch.backends.mkl.is_available() else None
    env = {k: os.environ.get(k) for k in PORTABLE_ENV}
    in_force = aten == "AVX2" and mkl in (None, PORTABLE_ENV["MKL_CBWR"]) and not portable_env_missing()
    return {"pinned": in_force, "aten_cpu_capability": aten, "mkl_cbwr": mkl, "env": env}


def pin_threading_env(threads: int | None = None) -> None:
    """Dynamic threading off (and, given ``threads``, the OpenMP / MKL pool size) before torch is imported."""
    for k, v in THREADING_ENV.items():
        os.environ.setdefault(k, v)
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(k, str(threads))


def apply_runtime(runtime: Any, seed: int) -> dict:
    """Pin threads, enable deterministic algorithms and seed Python / NumPy / torch; returns what is in effect."""
    import numpy as np
    import torch

    pin_threading_env()  # harmless if torch already initialised its pools; effective for child processes
    if getattr(runtime, "portable", False):
        missing = portable_env_missing()  # t3s.cli sets them before torch; a library caller is too late for some
        pin_portable_env()  # what is still lazy gets pinned; provenance records what is in force
        if missing:
            warnings.warn(f"runtime.portable: torch was imported before the instruction-set pins were set (had "
                          f"{missing}); provenance.json records which are in force", RuntimeWarning, stacklevel=2)
    if runtime.threads:
        torch.set_num_threads(int(runtime.threads))
    if runtime.interop_threads and torch.get_num_interop_threads() != runtime.interop_threads:
        # only settable before the first inter-op parallel work; provenance records the real value
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(int(runtime.interop_threads))
    if runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return runtime_state()


def runtime_state() -> dict:
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {k: os.environ.get(k) for k in (*THREADING_ENV, *PORTABLE_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                               "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED")},
    }


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def blas_info() -> dict:
    """BLAS / LAPACK / OpenMP / oneDNN as torch was built, from ``torch.__config__``."""
    import torch

    show = torch.__config__.show()
    info = {k.lower(): v for k, v in re.findall(r"(BLAS_INFO|LAPACK_INFO)=([^,\s]+)", show)}
    for pattern, key in ((r"Math Kernel Library Version ([^\n]+)", "mkl"), (r"OpenBLAS ([^\n]+)", "openblas"),
                         (r"MKL-DNN (v[^\s]+)", "onednn"), (r"OpenMP (\d+)", "openmp")):
        m = re.search(pattern, show)
        if m:
            info[key] = m.group(1).strip()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(runtime: Any, seed: int) -> dict:
    """Everything that decides the run's numbers besides its config and data, as one JSON-able dict."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    portable = {"requested": bool(getattr(runtime, "portable", False)), **portable_state()}
    cpu_type = ("any x86-64 CPU with AVX2 (instruction sets pinned: "
                + ", ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items()) + ")"
                if portable["pinned"] else "same CPU type (instruction sets not pinned: runtime.portable)")
    return {
        "runtime": {"threads": runtime.threads, "interop_threads": runtime.interop_threads,
                    "deterministic": runtime.deterministic, "portable": portable["requested"]},
        "in_effect": runtime_state(),
        "portable": portable,
        "seed": seed,
        "versions": {"python": sys.version.split()[0], "t3s": _version("t3s"), "torch": torch.__version__,
                     **{n: _version(n) for n in ("transformers", "numpy", "triton", "safetensors", "tokenizers",
                                                 "pyarrow", "math-verify")}},
        "blas": blas_info(),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
                    "cuda": torch.version.cuda},
        "reproducible_when": "same t3s config and data, same library versions and BLAS, same runtime.threads, "
                             f"{cpu_type} (GPU: same GPU model, CUDA and driver)",
    }
