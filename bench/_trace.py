"""Trace what a call really issues, at full LLM shapes, without a GPU and without allocating its tensors.

:class:`CostTracer` is a ``TorchDispatchMode`` over :class:`TracedTensor` s — wrapper tensors that hold a ``meta``
tensor (shape, dtype, strides, storage; no data) and *report* a chosen device (``cuda`` by default), so the library's
own dispatch (``impl="auto"`` → Triton on CUDA) takes the path it takes on a GPU, while the autograd engine sees a
``meta`` tensor and runs on this CPU. Per aten op the tracer records

* GEMM FLOPs, with the formulas of :mod:`torch.utils.flop_counter` (``mm`` / ``addmm`` / ``bmm`` / …);
* HBM bytes: every tensor argument is read once, every output written once (views and metadata ops move nothing;
  ``empty*`` writes nothing; ``copy_`` / ``fill_`` / ``zero_`` and ``out=`` targets are written, not read);
* live memory: each storage the call allocates is tracked (by a weak reference) from its creation until the last
  tensor using it is gone, so the peak of the live bytes is what a caching allocator would have to hold.

Small integer / float tensors (targets, weights, masks, counts: at most :data:`SHADOW_NUMEL` elements) also carry
a real CPU *shadow* computed op by op from the caller's real values, so data-dependent steps (``.item()``,
``nonzero``, boolean indexing, a device-side active-row count read by a kernel) follow the real data.

Host synchronisations (:attr:`CostTracer.syncs`, one entry per event, named by the op): every op whose result the
host must wait for on a GPU — a host read (``.item()`` / ``_local_scalar_dense``, ``bool(t)``, ``torch.equal``),
``.tolist()`` / ``.numpy()``, a device-to-host copy (``.cpu()``, ``.to("cpu")``, ``cpu_tensor.copy_(t)``), and the
ops whose output *shape* depends on device data (``nonzero`` / ``argwhere``, ``masked_select``, boolean-mask
indexing ``x[mask]`` and ``x[mask] = v``, ``unique``, ``repeat_interleave`` without ``output_size``). A
host-to-device copy (``t.to("cuda")`` of a host tensor, the batch's upload) is not a sync: the traced copy keeps the
host value as its shadow.

While tracing, ``torch.cuda``'s device queries answer for an H100 / H200 (132 SMs, 50 MiB of L2, sm_90), so code
that sizes its grid from the device sees the machine the model predicts for. Triton launches cannot run on ``meta``
tensors. While tracing, ``run`` of every Triton kernel class is replaced by
a recorder that evaluates the launch grid and hands the launch (kernel name, grid, arguments by name) to a cost
formula registered for that kernel name (:data:`KERNEL_FORMULAS`, filled by :mod:`bench.cost_model`); a kernel
without a formula is an error, never a silent zero.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

__all__ = [
    "KERNEL_FORMULAS",
    "CostTracer",
    "KernelCost",
    "Launch",
    "OpRecord",
    "TracedTensor",
]

aten = torch.ops.aten
SHADOW_NUMEL = 1 << 22  # tensors up to 4 Mi elements keep a real CPU shadow (N-sized vectors at N = 32k and more)

_WRITE_ONLY = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}
_NO_BYTES_FACTORIES = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
                       aten.new_empty.default, aten.new_empty_strided.default}
_BIG = 1 << 20
_MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
# ops whose output shape depends on device data: the host waits for the device to learn it
_SHAPE_SYNC_OPS = {aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique, aten._unique2,
                   aten.unique_consecutive, aten.unique_dim_consecutive, aten.equal, aten.is_nonzero}
_METADATA = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
             aten.is_contiguous.default, aten.is_contiguous.memory_format, aten.sym_is_contiguous.default,
             aten._assert_async.msg, aten._assert_async.default}


HOPPER = SimpleNamespace(name="traced Hopper (H100 / H200: 132 SMs, 50 MiB L2)", multi_processor_count=132,
                         L2_cache_size=50 * 2**20, total_memory=80 * 2**30, major=9, minor=0)
_CUDA_STUBS = {
    "_lazy_init": lambda: None,
    "get_device_properties": lambda device=None: HOPPER,
    "get_device_capability": lambda device=None: (9, 0),
    "current_device": lambda: 0,
}


_ACTIVE: list[CostTracer] = []  # the tracers entered, innermost last (TracedTensor's host reads report to it)


class TracedTensor(torch.Tensor):
    """A ``meta`` tensor that reports ``device`` (e.g. ``cuda``) to Python code; optionally a CPU shadow value."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device, shadow: torch.Tensor | None = None,
                requires_grad: bool = False):
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=elem.device, requires_grad=requires_grad,
        )
        r._elem = elem
        r._dev = device
        r._shadow = shadow
        return r

    @property
    def device(self) -> torch.device:  # what the library's dispatch sees
        return self._dev

    @property
    def is_cuda(self) -> bool:
        return self._dev.type == "cuda"

    @property
    def is_cpu(self) -> bool:
        return self._dev.type == "cpu"

    def __repr__(self) -> str:
        return f"TracedTensor({tuple(self.shape)}, {self.dtype}, device={self._dev})"

    def _host_value(self, what: str, count: bool = True) -> torch.Tensor:
        """The value a device-to-host read returns (counted as a sync by the active tracer unless ``count`` is
        False: the caller counted it)."""
        if count and _ACTIVE:
            _ACTIVE[-1]._sync(what)
        if self._shadow is None:
            raise RuntimeError(f"a host read ({what}) of a tensor whose value the tracer does not know")
        return self._shadow

    def tolist(self):
        return self._host_value("tolist").tolist()

    def numpy(self, *, force: bool = False):
        return self._host_value("numpy").numpy()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"TracedTensor reached {func} outside a CostTracer")


@dataclass
class KernelCost:
    """What one Triton launch costs: tensor-core FLOPs, HBM bytes, CTAs doing work, and how it was counted."""

    dot_flops: float
    hbm_bytes: float
    ctas: int
    formula: str
    l2_bytes: float = 0.0  # operand tile loads served from L2 (re-reads of tiles that stay resident)


@dataclass
class Launch:
    """A recorded Triton launch: evaluated grid and the arguments by name (tensors as :class:`TracedTensor`)."""

    name: str
    grid: tuple[int, ...]
    args: dict[str, Any]

    def size(self, *names: str) -> tuple[int, ...]:
        return tuple(int(self.args[n]) for n in names)

    def value(self, name: str) -> int:
        """The real value of a one-element device tensor argument (from its shadow), e.g. an active-row count."""
        t = self.args[name]
        if not isinstance(t, TracedTensor) or t._shadow is None:
            raise RuntimeError(f"kernel {self.name}: argument {name!r} has no traced value")
        return int(t._shadow.reshape(-1)[0].item())


KERNEL_FORMULAS: dict[str, Callable[[Launch], KernelCost]] = {}


@dataclass
class OpRecord:
    """One traced event: an aten op or a Triton launch."""

    kind: str  # "aten" | "triton"
    name: str
    gemm_flops: float = 0.0  # aten GEMMs (flop_counter) or Triton tl.dot work
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    dtype: str = ""
    shapes: tuple = ()
    ctas: int = 0
    formula: str = ""
    gemm_mnk: tuple[int, int, int] | None = None
    l2_bytes: float = 0.0  # Triton kernels: operand tile loads from L2 (aten GEMMs: derived from gemm_mnk)

    @property
    def hbm_bytes(self) -> float:
        return self.bytes_read + self.bytes_written


@dataclass
class _Alloc:
    ref: StorageWeakRef
    nbytes: int
    born: int
    died: int | None = None
    what: str = ""


def _touched_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a view really covers (broadcast dimensions with stride 0 count once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _elem(x):
    return x._elem if isinstance(x, TracedTensor) else x


def _storage_key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def _fmt_shapes(args) -> tuple:
    flat, _ = tree_flatten(args)
    return tuple(
        (tuple(a.shape), str(a.dtype).replace("torch.", "")) for a in flat if isinstance(a, torch.Tensor)
    )


class _Uploads(TorchFunctionMode):
    """``t.to(device)`` / ``t.cuda()`` of a host tensor to the traced device: a traced copy that keeps the host value
    (torch refuses a CUDA target before any dispatch mode sees the call on a build without CUDA)."""

    def __init__(self, tracer: CostTracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args and not isinstance(args[0], TracedTensor):
            if func is torch.Tensor.cuda:
                device, dtype = torch.device("cuda"), None
            else:
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None and device.type == self.tracer.device.type != "cpu":
                host = args[0].to(dtype=dtype or args[0].dtype)
                return self.tracer.real(host) if host.numel() <= SHADOW_NUMEL else self.tracer.tensor(host.shape,
                                                                                                       host.dtype)
        return func(*args, **kwargs)


class CostTracer(TorchDispatchMode):
    """Trace a call on :class:`TracedTensor` inputs; see the module docstring.

    Use :meth:`tensor` / :meth:`real` to make inputs, then ``with tracer, tracer.triton_launches(): ...``.
    After the call: :attr:`records`, :attr:`syncs` (the host synchronisations, by op; :attr:`host_syncs` their
    count), :meth:`peak_bytes` (optionally excluding the storages of tensors that are the call's outputs, e.g.
    gradients).
    """

    def __init__(self, device: str | torch.device = "cuda"):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.records: list[OpRecord] = []
        self.syncs: list[str] = []
        self._allocs: list[_Alloc] = []
        self._live: dict[int, int] = {}  # storage key -> index into _allocs
        self._clock = 0

    # ---------------------------------------------------------------------------------------------------- inputs

    def tensor(self, shape, dtype, requires_grad: bool = False) -> TracedTensor:
        """A data-less input of ``shape`` / ``dtype`` on the reported device (not counted as the call's memory)."""
        elem = torch.empty(shape, dtype=dtype, device="meta")
        return TracedTensor(elem, self.device, requires_grad=requires_grad)

    def real(self, value: torch.Tensor, requires_grad: bool = False) -> TracedTensor:
        """An input whose (small) real value is known: a CPU shadow travels with it."""
        elem = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return TracedTensor(elem, self.device, shadow=value.clone(), requires_grad=requires_grad)

    @property
    def host_syncs(self) -> int:
        return len(self.syncs)

    def _sync(self, what: str) -> None:
        if self.device.type != "cpu":  # on a CPU device a host read waits for nothing
            self.syncs.append(what)

    def _is_sync(self, func, args, kwargs) -> str | None:
        """The name of the host synchronisation ``func`` is on a GPU, or None (see the module docstring)."""
        if self.device.type == "cpu":  # nothing to wait for
            return None
        packet = func._overloadpacket
        if packet in _SHAPE_SYNC_OPS:
            return packet.__name__
        if packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            repeats = args[0] if func is aten.repeat_interleave.Tensor else args[1] if len(args) > 1 else None
            if isinstance(repeats, TracedTensor):
                return "repeat_interleave without output_size"
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            if any(isinstance(ix, torch.Tensor) and ix.dtype in (torch.bool, torch.uint8) for ix in args[1] if
                   ix is not None):
                return f"boolean-mask indexing ({packet.__name__})"
        if packet in (aten._to_copy, aten.to) and self.device.type != "cpu" and isinstance(args[0], TracedTensor):
            target = kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu":
                return "device-to-host copy (.cpu())"
        if packet is aten.copy_ and not isinstance(args[0], TracedTensor) and isinstance(args[1], TracedTensor):
            return "device-to-host copy (copy_)"
        return None

    # ------------------------------------------------------------------------------------------------- memory

    def _sweep(self, everything: bool = False) -> None:
        """Mark storages that died since the last op. Large ones (≥ 1 MiB) are checked at every op; small ones
        every 64 ops (their death is then recorded a little late: the peak can only be overstated, by little)."""
        everything = everything or self._clock % 64 == 0
        dead = [k for k, i in self._live.items()
                if (everything or self._allocs[i].nbytes >= _BIG) and self._allocs[i].ref.expired()]
        for key in dead:
            self._allocs[self._live.pop(key)].died = self._clock

    def _track(self, elem: torch.Tensor, what: str) -> None:
        key = _storage_key(elem)
        if key in self._live:
            return
        nbytes = elem.untyped_storage().nbytes()
        self._live[key] = len(self._allocs)
        self._allocs.append(_Alloc(StorageWeakRef(elem.untyped_storage()), nbytes, self._clock, what=what))

    def peak_bytes(self, exclude: tuple[torch.Tensor | None, ...] = ()) -> tuple[int, str]:
        """Peak of the live bytes allocated during the trace, leaving out the storages of ``exclude`` (outputs).

        Returns ``(bytes, description of the largest allocations live at the peak)``.
        """
        self._sweep(everything=True)
        skip = set()
        for t in exclude:
            if t is None:
                continue
            key = _storage_key(_elem(t))
            if key in self._live:
                skip.add(self._live[key])
        events: list[tuple[int, int, int]] = []  # (time, +1 alloc before -1 free at equal time?, idx)
        for i, a in enumerate(self._allocs):
            if i in skip:
                continue
            events.append((a.born, 1, i))
            if a.died is not None:
                events.append((a.died, 0, i))  # frees found at time t happened before the allocations of op t
        events.sort()
        live, peak, at = 0, 0, set()
        cur: set[int] = set()
        for _, kind, i in events:
            if kind == 1:
                cur.add(i)
                live += self._allocs[i].nbytes
                if live > peak:
                    peak, at = live, set(cur)
            else:
                cur.discard(i)
                live -= self._allocs[i].nbytes
        top = sorted(at, key=lambda i: -self._allocs[i].nbytes)[:4]
        desc = "; ".join(f"{self._allocs[i].what} {self._allocs[i].nbytes / 2**20:.0f} MiB" for i in top)
        return peak, desc

    # ---------------------------------------------------------------------------------------------- dispatch

    def __enter__(self):
        # factories with device="cuda" ask torch to initialise CUDA first; the tracer allocates nothing there
        # and kernels that size their grid from the device read its properties: an H100 / H200 (132 SMs, 50 MiB L2)
        self._saved_cuda = {k: getattr(torch.cuda, k) for k in _CUDA_STUBS}
        for k, v in _CUDA_STUBS.items():
            setattr(torch.cuda, k, v)
        _ACTIVE.append(self)
        self._uploads = _Uploads(self)
        self._uploads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        for k, v in self._saved_cuda.items():
            setattr(torch.cuda, k, v)
        _ACTIVE.remove(self)
        out = super().__exit__(*exc)
        self._uploads.__exit__(*exc)
        return out

    def _is_traced_factory(self, kwargs) -> bool:
        dev = kwargs.get("device")
        if dev is None:
            return self.device.type == "cpu"
        return torch.device(dev).type == self.device.type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat_in, _ = tree_flatten((args, kwargs))
        traced_in = [a for a in flat_in if isinstance(a, TracedTensor)]
        factory = False
        if not traced_in:
            if self._is_upload(func, args, kwargs):
                host = args[0].to(kwargs.get("dtype") or args[0].dtype)
                return self.real(host) if host.numel() <= SHADOW_NUMEL else self.tensor(host.shape, host.dtype)
            has_tensor = any(isinstance(a, torch.Tensor) for a in flat_in)
            is_factory = not has_tensor and any(a.name == "device" for a in func._schema.arguments)
            if not (is_factory and self._is_traced_factory(kwargs)):
                return func(*args, **kwargs)  # host-side work on real tensors: not the call's device cost
            factory = True
        if func is aten._local_scalar_dense.default:
            return args[0]._host_value(".item()").item()
        sync = self._is_sync(func, args, kwargs)
        if sync is not None:
            self._sync(sync)
            if sync.startswith("device-to-host"):
                return self._download(func, args, kwargs)
        if func in _METADATA:
            return func(*tree_map(_elem, args), **tree_map(_elem, kwargs))
        self._clock += 1
        self._sweep()

        meta_kwargs = dict(tree_map(_elem, kwargs))
        if "device" in meta_kwargs and meta_kwargs["device"] is not None:
            meta_kwargs["device"] = torch.device("meta")
        if factory and "device" not in meta_kwargs:
            meta_kwargs["device"] = torch.device("meta")
        meta_args = tree_map(_elem, args)

        shadowable = all(t._shadow is not None for t in traced_in)
        shadow_out = None
        try:
            out = func(*meta_args, **meta_kwargs)
        except (NotImplementedError, RuntimeError) as exc:  # data-dependent output shape: use the shadow
            if not shadowable:
                out = self._index_with_shadow_masks(func, args, kwargs, meta_args, meta_kwargs, exc)
            else:
                shadow_out = self._shadow_call(func, args, kwargs)
                out = tree_map(
                    lambda s: torch.empty_strided(s.shape, s.stride(), dtype=s.dtype, device="meta")
                    if isinstance(s, torch.Tensor) else s, shadow_out,
                )
        flat_out, _ = tree_flatten(out)
        small = all(t.numel() <= SHADOW_NUMEL for t in flat_out if isinstance(t, torch.Tensor))
        if shadow_out is None and shadowable and small:
            try:
                shadow_out = self._shadow_call(func, args, kwargs)
            except (NotImplementedError, RuntimeError):  # e.g. a CUDA-only overload: the value stays unknown
                shadow_out = None

        # wrap: in-place / out= results are the input wrappers themselves
        by_elem = {id(a._elem): a for a in traced_in}
        mutated = self._mutated_args(func, args, kwargs)

        def wrap(e):
            if not isinstance(e, torch.Tensor) or e.device.type != "meta":
                return e
            if id(e) in by_elem:
                return by_elem[id(e)]
            return TracedTensor(e, self.device)

        result = tree_map(wrap, out)
        flat_res, _ = tree_flatten(result)
        flat_sh = tree_flatten(shadow_out)[0] if shadow_out is not None else [None] * len(flat_res)
        for r, s in zip(flat_res, flat_sh, strict=False):
            if isinstance(r, TracedTensor):
                r._shadow = s if isinstance(s, torch.Tensor) and s.numel() <= SHADOW_NUMEL else None
        if shadow_out is None:
            for m in mutated:
                m._shadow = None

        self._account(func, args, kwargs, flat_res, traced_in, mutated, factory)
        return result

    def _is_upload(self, func, args, kwargs) -> bool:
        """A host tensor copied to the traced device (``t.to("cuda")``): the batch's upload, not a sync."""
        target = kwargs.get("device")
        return (func._overloadpacket is aten._to_copy and target is not None and self.device.type != "cpu"
                and torch.device(target).type == self.device.type and isinstance(args[0], torch.Tensor)
                and args[0].device.type == "cpu")

    def _download(self, func, args, kwargs):
        """A device-to-host copy: the host gets the traced value (an error where the tracer does not know it)."""
        if func._overloadpacket is aten.copy_:
            return args[0].copy_(args[1]._host_value("copy_ to the host", count=False))
        value = args[0]._host_value(".cpu()", count=False)
        return value.to(dtype=kwargs.get("dtype") or value.dtype, copy=True)

    def _shadow_call(self, func, args, kwargs):
        def sh(x):
            return x._shadow if isinstance(x, TracedTensor) else x

        s_kwargs = dict(tree_map(sh, kwargs))
        if "device" in s_kwargs and s_kwargs["device"] is not None:
            s_kwargs["device"] = torch.device("cpu")
        with torch.utils._python_dispatch._disable_current_modes():
            return func(*tree_map(sh, args), **s_kwargs)

    def _index_with_shadow_masks(self, func, args, kwargs, meta_args, meta_kwargs, exc):
        """``x[mask]`` on a big tensor with a known boolean mask: index with the mask's ``nonzero`` instead."""
        if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            raise RuntimeError(f"{func}: data-dependent output on tensors without traced values ({exc})") from exc
        indices = list(args[1])
        new = []
        for ix in indices:
            if isinstance(ix, TracedTensor) and ix.dtype in (torch.bool, torch.uint8):
                if ix._shadow is None:
                    raise RuntimeError(f"{func}: boolean index without a traced value") from exc
                nz = ix._shadow.nonzero()
                for _ in range(nz.shape[1]):
                    new.append(torch.empty(nz.shape[0], dtype=torch.long, device="meta"))
            else:
                new.append(_elem(ix))
        meta_args = (meta_args[0], new, *meta_args[2:])
        return func(*meta_args, **meta_kwargs)

    @staticmethod
    def _mutated_args(func, args, kwargs) -> list[TracedTensor]:
        out = []
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            v = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
            if isinstance(v, TracedTensor):
                out.append(v)
        return out

    def _account(self, func, args, kwargs, flat_res, traced_in, mutated, factory) -> None:
        in_keys = {_storage_key(t._elem) for t in traced_in}
        mutated_ids = {id(m) for m in mutated}
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        new_outputs = [r for r in flat_res if isinstance(r, TracedTensor) and id(r) not in mutated_ids]
        if not is_view and not mutated:  # ops such as _unsafe_view return a tensor sharing an input's storage
            is_view = bool(new_outputs) and all(_storage_key(r._elem) in in_keys for r in new_outputs)
        rec = OpRecord("aten", str(func).replace("aten.", ""), shapes=_fmt_shapes(args))
        if not is_view:
            positional = {id(a) for a in tree_flatten(args)[0]}
            out_kw = {id(v) for k, v in kwargs.items()
                      if k.startswith("out") and isinstance(v, TracedTensor) and id(v) not in positional}
            write_only = func in _WRITE_ONLY
            reads = [t for t in traced_in if id(t) not in out_kw and not (write_only and t is args[0])]
            seen = set()
            for t in reads:
                if id(t) not in seen:
                    seen.add(id(t))
                    rec.bytes_read += _touched_bytes(t._elem)
            if func not in _NO_BYTES_FACTORIES:
                rec.bytes_written = sum(_touched_bytes(r._elem) for r in flat_res if isinstance(r, TracedTensor))
            for r in new_outputs:
                self._track(r._elem, f"{rec.name}{tuple(r.shape)} {str(r.dtype).replace('torch.', '')}")
        packet = func._overloadpacket
        if packet in flop_registry:
            f_args, f_kwargs = tree_map(_elem, args), tree_map(_elem, kwargs)
            if packet in _MATMULS:  # the *.dtype overloads pass out_dtype positionally: keep the matrices only
                f_args, f_kwargs = tuple(a for a in f_args if isinstance(a, torch.Tensor)), {}
            out_val = _elem(flat_res[0]) if flat_res else None
            rec.gemm_flops = float(flop_registry[packet](*f_args, **f_kwargs, out_val=out_val))
            rec.gemm_mnk = self._mnk(packet, args)
            operand = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2][-1]  # mat2 / batch2
            rec.dtype = str(operand.dtype).replace("torch.", "")  # the multiplied operands set the tensor-core rate
        if rec.gemm_flops or rec.hbm_bytes or factory:
            self.records.append(rec)

    @staticmethod
    def _mnk(packet, args) -> tuple[int, int, int] | None:
        mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
        if packet in (aten.mm, aten.addmm) and len(mats) >= 2:
            a, b = mats[-2], mats[-1]
            return (a.shape[0], b.shape[1], a.shape[1])
        return None

    # ----------------------------------------------------------------------------------------- triton launches

    @contextlib.contextmanager
    def triton_launches(self) -> Iterator[None]:
        """Replace ``run`` of Triton's kernel classes by a recorder; GPU launch configs (not the interpreter's)."""
        import triton.runtime.autotuner as autotuner
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit

        classes = [jit.JITFunction, interpreter.InterpretedFunction, autotuner.Autotuner, autotuner.Heuristics]
        saved = {cls: cls.__dict__.get("run") for cls in classes}
        tracer = self

        def run(kernel, *args, grid, warmup=False, **kwargs):
            tracer._launch(kernel, args, grid, kwargs)

        old_env = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"  # the library picks its GPU tile configs
        try:
            for cls in classes:
                cls.run = run
            yield
        finally:
            for cls, fn in saved.items():
                if fn is None:
                    with contextlib.suppress(AttributeError):
                        delattr(cls, "run")
                else:
                    cls.run = fn
            if old_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old_env

    def _launch(self, kernel, args, grid, kwargs) -> None:
        base = kernel
        config_kwargs: dict[str, Any] = {}
        while not hasattr(base, "arg_names") or type(base).__name__ in ("Autotuner", "Heuristics"):
            if type(base).__name__ == "Autotuner":  # trace the first config (what runs without tuning data)
                config_kwargs.update(base.configs[0].all_kwargs())
            base = base.fn
        fn = getattr(base, "fn", base)
        name = getattr(fn, "__name__", str(fn))
        named = dict(zip(base.arg_names, args, strict=False))
        named.update(kwargs)
        named.update(config_kwargs)
        g = grid(named) if callable(grid) else grid
        g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
        if name not in KERNEL_FORMULAS:
            raise KeyError(f"the cost model has no formula for Triton kernel {name!r}: add one to "
                           "bench/cost_model.py (KERNEL_FORMULAS)")
        self._clock += 1
        self._sweep()
        cost = KERNEL_FORMULAS[name](Launch(name, g, named))
        dtype = next((str(v.dtype).replace("torch.", "") for k, v in named.items()
                      if isinstance(v, torch.Tensor) and k in ("h", "x", "hidden")), "")
        self.records.append(OpRecord(
            "triton", name, gemm_flops=cost.dot_flops, bytes_read=cost.hbm_bytes, dtype=dtype,
            ctas=cost.ctas, formula=cost.formula, l2_bytes=cost.l2_bytes,
        ))


@dataclass
class TraceSummary:
    """Totals of a trace (see :func:`summarise`)."""

    gemm_flops: float
    hbm_bytes: float
    launches: int
    host_syncs: int
    workspace_bytes: int
    workspace_at_peak: str
    records: list[OpRecord] = field(repr=False, default_factory=list)


def summarise(tracer: CostTracer, outputs: tuple) -> TraceSummary:
    peak, desc = tracer.peak_bytes(exclude=outputs)
    return TraceSummary(
        gemm_flops=sum(r.gemm_flops for r in tracer.records),
        hbm_bytes=sum(r.hbm_bytes for r in tracer.records),
        launches=len(tracer.records),
        host_syncs=tracer.host_syncs,
        workspace_bytes=peak,
        workspace_at_peak=desc,
        records=list(tracer.records),
    )
