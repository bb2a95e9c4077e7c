"""Public functionals: :func:`linear_cross_entropy` and :func:`token_logprobs`.

Both are thin torch-level combinations of one per-token primitive (``lse``, target logit, ``Σz``, entropy, all
fp32) computed straight from the hidden states and the LM-head weight without materialising ``[N, V]`` logits.
This module validates arguments, flattens ``[..., D]`` to ``[N, D]``, picks the backend (``impl``) and the
strategy, and does the reductions in PyTorch.

Numerics: fp16 / bf16 / fp32 inputs (hidden and weight of the same dtype; under ``torch.autocast`` both are cast
to the autocast dtype first), fp32 logit accumulation, fp32 LSE,
target logit from the same accumulator as the LSE (so the cross-entropy is never negative), fp32 weight-gradient
accumulation. fp64 inputs run the reference in fp64.

Value checks (target range, finite weights, weight signs, the normaliser; see :mod:`._checks`): on CPU they run
eagerly and raise ``ValueError``. On CUDA an eager check would force a host sync on every call, so by default they
run as ``torch._assert_async`` (device-side assert, no sync: a bad target aborts the CUDA context with the message
below instead of raising a Python error); set ``T3S_CHECK_INPUTS=1`` to get the eager, synchronising
``ValueError`` on CUDA as well. Meta tensors skip them.

Under ``torch.compile`` both functionals trace to ``torch.library`` custom ops (:mod:`.ops`) with no graph break and
no host sync (value checks become device-side asserts on every device); eager calls run as before.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from .._guards import reject_transforms
from .._triton import IMPLS, resolve_impl
from . import _checks
from . import ops as _ops  # registers the torch.library ops used under torch.compile
from .chunked import WEIGHT_GRAD_ACCUMULATIONS, ChunkedOptions, active_row_index
from .function import StatsOptions, chunked_cross_entropy, chunked_token_stats, linear_token_stats
from .vocab_parallel import VocabParallel, resolve_vocab_parallel, vocab_parallel_token_stats

__all__ = ["TokenLogprobs", "VocabParallel", "linear_cross_entropy", "token_logprobs"]

REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "fused", "chunked")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TokenLogprobs(NamedTuple):
    """Per-token outputs of :func:`token_logprobs`, fp32 with the shape of ``targets`` (0 at ignored positions)."""

    logprob: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------


def _eager_checks(device: torch.device) -> bool:
    return _checks.value_check_mode(device) == "eager"


def _check_tensor(name: str, t, *, shape_hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")


def _validate(
    hidden, weight, targets, bias, *, ignore_index, softcap, temperature, impl, fn: str, vocab_size: int | None = None
) -> tuple[int, int]:
    _check_tensor("hidden", hidden, shape_hint="[..., D]")
    _check_tensor("weight", weight, shape_hint="[V, D]")
    _check_tensor("targets", targets, shape_hint="[...] (hidden.shape[:-1])")
    reject_transforms(
        fn, "Call it outside the transform: hidden [..., D] takes any leading batch dims (instead of vmap), "
        "gradients come from torch.autograd (loss.backward() / torch.autograd.grad), and reduction='none' gives "
        "per-token losses whose backward takes any per-token upstream gradient.",
        hidden=hidden, weight=weight, targets=targets, bias=bias,
    )
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: hidden must have shape [..., D] (at least 1-D), got a 0-d tensor")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: hidden must be float16/bfloat16/float32/float64, got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"{fn}: hidden's last dim ({hidden.shape[-1]}) must equal weight.shape[1] (D={D}); "
            f"got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if V < 1:
        raise ValueError(f"{fn}: weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{fn}: weight dtype ({weight.dtype}) must equal hidden dtype ({hidden.dtype}); cast one of them "
            "(or run under torch.autocast so both arrive in the same dtype)"
        )
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(
            f"{fn}: hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, "
            f"{targets.device}"
        )
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{fn}: targets must be an integer tensor (class indices), got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{fn}: targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if bias is not None:
        _check_tensor("bias", bias, shape_hint="[V]")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{fn}: bias must have shape [V] = ({V},), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"{fn}: bias must be a float tensor, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"{fn}: bias must be on {hidden.device}, got {bias.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (temperature > 0):
        raise ValueError(f"{fn}: temperature must be a float > 0, got {temperature!r}")
    if temperature == float("inf"):
        raise ValueError(f"{fn}: temperature must be finite, got {temperature!r}")
    if softcap is not None and (
        not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not (0 < softcap < float("inf"))
    ):
        raise ValueError(f"{fn}: softcap must be None or a finite float > 0, got {softcap!r}")
    # targets in [0, V) or == ignore_index (V global under vocabulary parallelism)
    V_local, V = V, (vocab_size or V)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if _eager_checks(hidden.device):
        if targets.numel() and bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(
                f"{fn}: targets must be in [0, V={V}) or equal ignore_index={ignore_index}; found {first}"
            )
    elif targets.numel() and _checks.value_check_mode(hidden.device) == "async":
        torch._assert_async(~bad.any(), f"{fn}: targets must be in [0, V={V}) or equal ignore_index={ignore_index}")
    return V_local, D


def _validate_token_weight(token_weight, targets, fn: str, *, signed_ok: bool = True) -> None:
    """``signed_ok=False`` (``reduction="mean"`` without a normaliser): the weights are the mean's denominator,
    so they must be ``>= 0`` (see :mod:`._checks` for what signed weights mean)."""
    _check_tensor("token_weight", token_weight, shape_hint="[...] (same shape as targets)")
    reject_transforms(fn, "Call it outside the transform.", token_weight=token_weight)
    if not token_weight.is_floating_point():
        raise TypeError(f"{fn}: token_weight must be a float tensor, got {token_weight.dtype}")
    if tuple(token_weight.shape) != tuple(targets.shape):
        raise ValueError(
            f"{fn}: token_weight must have the shape of targets {tuple(targets.shape)}, got {tuple(token_weight.shape)}"
        )
    if token_weight.device != targets.device:
        raise ValueError(f"{fn}: token_weight must be on {targets.device}, got {token_weight.device}")
    if token_weight.numel():
        tw = token_weight.detach()
        _checks.require(torch.isfinite(tw).all(), f"{fn}: token_weight must be finite (found NaN or inf)",
                        tw.device)
        if not signed_ok:
            _checks.require((tw >= 0).all(), f"{fn}: {_checks.NEGATIVE_MEAN_WEIGHT}", tw.device)


def _autocast_entry(fn):
    """Under ``torch.autocast``: cast ``hidden`` and ``weight`` to the autocast dtype (as
    ``torch.amp.custom_fwd(cast_inputs=...)`` would; the cast is differentiable, so fp32 master weights get fp32
    gradients), then run with autocast off so the internal matmuls keep their fp32 accumulation. Else: unchanged."""

    @functools.wraps(fn)
    def wrapper(hidden, weight, targets, **kwargs):
        if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor):
            dev = hidden.device.type
            if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
                dtype = torch.get_autocast_dtype(dev)
                half_ok = (torch.float32, torch.float16, torch.bfloat16)
                hidden = hidden.to(dtype) if hidden.dtype in half_ok else hidden
                weight = weight.to(dtype) if weight.dtype in half_ok else weight
                with torch.autocast(dev, enabled=False):
                    return fn(hidden, weight, targets, **kwargs)
        return fn(hidden, weight, targets, **kwargs)

    return wrapper


def _token_stats(hidden, weight, bias, targets, opts, backend, vp):
    """The per-token primitive outside the chunked path: vocabulary-parallel shards, calls traced by
    ``torch.compile`` (the op ``t3s::token_stats``), and the fused Triton strategy (off CUDA: the chunked path's
    torch rows, in the primitive's shape)."""
    if vp is None and torch.compiler.is_compiling():
        # traced as the custom op t3s::token_stats (eager calls never go through it)
        return _ops.token_stats(hidden, weight, bias, targets, opts, backend)
    if vp is None:
        return linear_token_stats(hidden, weight, bias, targets, opts, backend)
    return vocab_parallel_token_stats(hidden, weight, bias, targets, opts, backend, vp)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------------------

# Cost rule between the two training strategies on the Triton backend (strategy="auto"). With compaction the chunked
# path skips inactive rows as well, and its 6·n·D·V (8·n·D·V for per-token outputs) GEMM FLOPs run at cuBLAS speed,
# against 10·n·D·V for the fused recompute kernels at a fraction of it (their dh / dW kernels read-modify-write fp32
# slabs per tile), so it wins at every LLM shape. The fused kernels win only where the whole call is tiny: no host
# read of the active count, no workspace, three launches instead of ~10 per chunk. Rule: fused when
# 2·n·D·V <= FUSED_MAX_FLOPS, where n = the active row count when the caller hands ``active_rows`` over (very sparse
# masks) and the total row count N otherwise (known without a sync). 2^28 FLOPs ≈ 0.3 ms of one SM, ~1 µs of a
# whole H100 GEMM: below it launch and sync latency dominate (a prediction of the cost model, env override
# T3S_FUSED_MAX_FLOPS).
FUSED_MAX_FLOPS = 2**28


def _fused_max_flops() -> int:
    env = os.environ.get("T3S_FUSED_MAX_FLOPS")
    return int(env) if env else FUSED_MAX_FLOPS


def _backend(impl: str, device: torch.device) -> str:
    """``"reference"`` (the oracle), ``"triton"`` (CUDA, or the interpreter when asked for) or ``"torch"`` (the
    chunked path with torch row ops: ``impl="auto"`` off CUDA)."""
    backend = resolve_impl(impl, device)
    if impl == "auto" and backend == "reference" and device.type == "cpu":  # meta tensors keep the reference
        return "torch"
    return backend


def _use_fused(strategy: str, n_rows: int, D: int, V: int) -> bool:
    if strategy != "auto":
        return strategy == "fused"
    return 2 * n_rows * D * V <= _fused_max_flops()


def _check_chunked_args(fn, active_rows, workspace_bytes, weight_grad_accumulation, device) -> None:
    if active_rows is not None:
        if not isinstance(active_rows, torch.Tensor):
            kind = type(active_rows).__name__
            raise TypeError(f"{fn}: active_rows must be a 1-D int64 tensor of row indices, got {kind}")
        if active_rows.dim() != 1 or active_rows.dtype != torch.int64:
            raise ValueError(
                f"{fn}: active_rows must be a 1-D int64 tensor, got shape {tuple(active_rows.shape)} "
                f"{active_rows.dtype}"
            )
        if active_rows.device != device:
            raise ValueError(f"{fn}: active_rows must be on {device}, got {active_rows.device}")
    if workspace_bytes is not None and (
        isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes < 1
    ):
        raise ValueError(f"{fn}: workspace_bytes must be None or a positive int, got {workspace_bytes!r}")
    if weight_grad_accumulation not in WEIGHT_GRAD_ACCUMULATIONS:
        raise ValueError(
            f"{fn}: weight_grad_accumulation must be one of {WEIGHT_GRAD_ACCUMULATIONS}, "
            f"got {weight_grad_accumulation!r}"
        )


def _ce_per_token(nll, smooth, lse, eps: float, zl: float):
    """``(1 − ε)·nll + ε·smooth + z_loss·lse²`` per token (``smooth = lse − Σz/V``, used only when ε > 0)."""
    per_tok = (1.0 - eps) * nll
    if eps > 0:
        per_tok = per_tok + eps * smooth
    if zl > 0:
        per_tok = per_tok + zl * lse * lse
    return per_tok


def _reduce(per_tok, w, reduction: str, denominator):
    if w is not None:
        per_tok = per_tok * w
    if reduction == "none":
        return per_tok
    if reduction == "sum":
        return per_tok.sum()
    return per_tok.sum() / denominator(per_tok.dtype)


# --------------------------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------------------------


@_autocast_entry
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    shift: bool | int = False,
    return_lse: bool = False,
    impl: str = "auto",
    strategy: str = "auto",
    active_rows: torch.Tensor | None = None,
    workspace_bytes: int | None = None,
    weight_grad_accumulation: str = "fp32",
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``softmax(cap(hidden @ weight.T + bias) / temperature)`` without ``[N, V]`` logits.

    Per token ``i`` (``z`` = transformed logits, ``ε`` = ``label_smoothing``)::

        loss_i = (1 − ε)(lse_i − z_{i, y_i}) + ε(lse_i − Σ_v z_{i,v} / V) + z_loss · lse_i²

    Args:
        hidden: ``[..., D]`` fp16 / bf16 / fp32 (fp64 runs the reference). Need not be contiguous.
        weight: ``[V, D]``, same dtype as ``hidden`` (the LM-head weight).
        targets: ``[...] = hidden.shape[:-1]`` integer class ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        token_weight: optional ``[...]`` float per-token weight (a T3S 0/1 mask is a weight). Rows with weight 0
            count as ignored: no loss, no gradient, no GEMM work. Treated as a constant (no gradient flows to
            it). Finite; negative weights (RL-style signed weights, e.g. advantages) are allowed with
            ``reduction="sum"`` / ``"none"`` and with ``"mean"`` plus a ``normalizer``, and rejected for ``"mean"``
            without one (``Σ wᵢ`` is then the denominator, undefined for signed weights).
        class_weight: optional ``[V]`` float weight per class, ``torch.nn.functional.cross_entropy``'s
            ``weight`` (named so because ``weight`` is the LM head): token ``i``'s loss is scaled by
            ``class_weight[yᵢ]`` and ``"mean"`` divides by ``Σ class_weight[yᵢ]·wᵢ`` — exactly F.cross_entropy.
            Folded into the per-token weight (z-loss is scaled the same way; a class of weight 0 counts as
            ignored); a constant. Not combined with ``label_smoothing > 0`` (PyTorch then weights the smoothing
            term's every class, which is no per-token weight): that raises ``ValueError``.
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: ``"mean"``: ``Σ wᵢ·lossᵢ / Σ wᵢ`` over non-ignored tokens (``wᵢ = 1`` without
            ``token_weight``); 0 (not NaN) when no weight is left — never the undivided sum. ``"sum"``:
            ``Σ wᵢ·lossᵢ``. ``"none"``: ``wᵢ·lossᵢ`` per token with the shape of ``targets`` (0 at ignored
            tokens); its backward is exact for any per-token upstream gradient.
        normalizer: only with ``reduction="mean"``: divide ``Σ wᵢ·lossᵢ`` by this instead of ``Σ wᵢ`` (a device
            tensor such as the token count of a whole optimizer step keeps gradient accumulation exact, with no
            host sync). Finite and ``>= 0``; 0 only when no weighted token is left (an empty step: loss 0,
            gradients 0), else ``ValueError``.
        label_smoothing: ``ε`` in ``[0, 1)``, as ``torch.nn.functional.cross_entropy``.
        z_loss: coefficient of ``lse²`` (PaLM z-loss on the transformed logits).
        softcap: logits become ``softcap · tanh(x / softcap)`` before the temperature (Gemma 2).
        temperature: logits are divided by ``temperature`` (> 0).
        shift: ``bool`` or ``int k >= 0`` (Cut Cross-Entropy's ``shift``; ``True`` is 1): position ``t`` of
            ``hidden`` is scored against ``targets[..., t + k]`` without copying ``hidden`` (``targets`` are then
            the input ids; ``token_weight`` is aligned with ``targets`` and shifts the same way); the last ``k``
            positions have no target. ``reduction="none"`` outputs and ``lse`` then have shape
            ``[..., T − k]``, element ``t`` belonging to hidden position ``t`` (CCE instead returns ``[..., T]``
            aligned with ``targets``). Anything else (a float, a string) is a ``TypeError``.
        return_lse: also return the per-token fp32 LSE of the transformed logits (0 at ignored tokens),
            differentiable.
        impl: ``"auto"`` (Triton on CUDA; the chunked PyTorch path of :mod:`t3s_kernels.linear_ce.chunked` on CPU),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"reference"`` (the pure-autograd oracle).
        strategy: Triton only, with gradients. ``"chunked"``: GEMM-bound chunks of active rows (torch matmuls,
            a Triton row kernel for the statistics / ``dlogits``); ``"mean"`` / ``"sum"`` without a
            differentiable ``lse`` form the gradients in the forward (6·n·D·V FLOPs, ``n`` = active rows) and the
            backward scales them in place; ``"none"`` and ``return_lse`` store the per-token LSE and recompute the
            logits in the backward (8·n·D·V). ``"fused"``: the fused Triton kernels, nothing ``[N, V]`` stored,
            recompute in the backward (10·n·D·V). ``"auto"`` (default): the cost rule ``FUSED_MAX_FLOPS`` of this
            module — fused only for tiny calls, chunked at every LLM shape. Calls that need no gradient run the
            fused forward pass on the Triton backend, the chunked statistics sweep on the PyTorch one.
        active_rows: optional 1-D int64 tensor of the rows of ``hidden.reshape(-1, D)`` that are scored (after
            ``shift = k``: row ``t`` is scored when ``targets[..., t + k]`` is not ``ignore_index`` and its
            weight is not 0), each exactly once, on ``hidden``'s device. The chunked path gathers these rows
            only; handing the index over (e.g. built on the host with the batch) avoids its one host read of the
            active count on CUDA (without it ``nonzero`` is used: one sync per call on CUDA, free on CPU).
            Checked: eagerly on CPU, device-side (no sync) on CUDA.
        workspace_bytes: memory budget of the chunked path's reusable workspace (default: 768 MiB on CUDA, 256 MiB
            on CPU; env ``T3S_WORKSPACE_BYTES``); see :mod:`t3s_kernels.linear_ce.chunked` for the chunk plan.
        weight_grad_accumulation: ``"fp32"`` (default, exact): the weight gradient is accumulated across row
            chunks in fp32 — no workspace for fp32 weights (the accumulator is the output), an fp32 ``[V, D]``
            buffer (V·D·4 bytes, 2.5 GB at V = 151936, D = 4096) for half weights. ``"weight_dtype"`` (opt-in,
            approximate): accumulate in the weight's dtype (each chunk's GEMM still sums its rows in fp32).
        vocab_parallel: ``weight`` (and ``bias``) is this rank's vocabulary shard ``[vocab_start, vocab_end)``;
            per-token statistics are combined across the group (:mod:`t3s_kernels.linear_ce.vocab_parallel`).
            A ``DTensor`` weight sharded on dim 0 sets it automatically. Targets are global ids; the per-token
            primitive runs on each shard (fused kernels on CUDA, the reference on CPU).

    Returns:
        The fp32 loss (scalar, or ``[...]`` for ``"none"``), or ``(loss, lse)`` when ``return_lse``.

    Meta tensors run the reference (shapes and dtypes only; value checks are skipped). ``torch.func``
    transforms (``vmap``, ``grad``, ``jvp``, ...) are not supported and raise ``TypeError``.

    Examples:
        >>> import torch
        >>> h = torch.randn(2, 5, 8, requires_grad=True); W = torch.randn(11, 8)
        >>> y = torch.randint(0, 11, (2, 5))
        >>> loss = linear_cross_entropy(h, W, y, shift=True, label_smoothing=0.1)
        >>> loss.backward()
    """
    fn = "linear_cross_entropy"
    weight, bias, vp = resolve_vocab_parallel(weight, bias, vocab_parallel, fn)
    V, D = _validate(
        hidden, weight, targets, bias, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
        impl=impl, fn=fn, vocab_size=vp.vocab_size if vp is not None else None,
    )
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(label_smoothing, (int, float)) or not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"{fn}: label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not (0.0 <= z_loss < float("inf")):
        raise ValueError(f"{fn}: z_loss must be a finite float >= 0, got {z_loss!r}")
    signed_ok = reduction != "mean" or normalizer is not None  # mean without normaliser: Σ wᵢ is the denominator
    if token_weight is not None:
        _validate_token_weight(token_weight, targets, fn, signed_ok=signed_ok)
    if class_weight is not None:
        _checks.check_class_weight(class_weight, V, hidden.device, label_smoothing=float(label_smoothing),
                                   signed_ok=signed_ok, fn=fn)
    if normalizer is not None:
        _checks.check_normalizer(normalizer, reduction, fn)
    _check_chunked_args(fn, active_rows, workspace_bytes, weight_grad_accumulation, hidden.device)
    shift = _checks.check_shift(shift, targets, fn)
    if (torch.compiler.is_compiling() and vp is None and reduction != "none" and not return_lse
            and _needs_grad(hidden, weight, bias)):
        # the compiled graph calls this whole function as one custom op (t3s::lce_reduced)
        return _ops.lce_reduced(
            hidden, weight, targets, bias=bias, token_weight=token_weight, class_weight=class_weight,
            ignore_index=ignore_index, reduction=reduction, normalizer=normalizer, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, temperature=temperature, shift=shift, impl=impl, strategy=strategy,
            active_rows=active_rows, workspace_bytes=workspace_bytes, weight_grad_accumulation=weight_grad_accumulation,
        )
    if shift:  # position t is scored against targets[..., t + shift]; the last `shift` positions have no target
        n_pad = min(shift, targets.shape[-1])
        pad = targets.new_full((*targets.shape[:-1], n_pad), ignore_index)
        targets = torch.cat([targets[..., shift:], pad], dim=-1)
        if token_weight is not None:
            tw_pad = token_weight.new_zeros((*token_weight.shape[:-1], n_pad))
            token_weight = torch.cat([token_weight[..., shift:], tw_pad], dim=-1)
    if class_weight is not None:
        token_weight = _checks.fold_class_weight(class_weight, targets, token_weight, ignore_index)
    if normalizer is not None:
        _checks.check_normalizer_not_empty(normalizer, targets, token_weight, ignore_index, fn)
    n_scored = max(targets.shape[-1] - shift, 0) if shift else None  # positions kept by reduction="none" and lse

    out_shape = tuple(targets.shape)
    device = hidden.device
    backend = _backend(impl, device)
    h2 = hidden.reshape(-1, D)
    y = targets.reshape(-1)
    N = h2.shape[0]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = token_weight.reshape(-1).detach().to(acc_dtype) if token_weight is not None else None
    if w is not None:  # weight 0 ≡ ignored: the primitive then skips the row
        y = torch.where(w != 0, y, torch.full_like(y, ignore_index))
    active = y != ignore_index
    eps, zl = float(label_smoothing), float(z_loss)
    needs_grad = _needs_grad(hidden, weight, bias)

    def denominator(dtype: torch.dtype) -> torch.Tensor | float:
        # 0 only when no weighted token is left (the checks above): dividing by inf then gives a loss and
        # gradients of exactly 0, never NaN, and never the undivided sum
        if normalizer is not None and not isinstance(normalizer, torch.Tensor):
            return float(normalizer) or float("inf")  # a Python number: no host-to-device copy
        if normalizer is None:
            den = (w * active).sum() if w is not None else active.sum()
        else:
            den = normalizer.detach().reshape(()).to(device)
        den = den.to(dtype)
        return torch.where(den == 0, torch.full_like(den, float("inf")), den)

    if hidden.dtype == torch.float64 or N == 0:
        backend = "reference"
    use_chunked = vp is None and not torch.compiler.is_compiling() and (backend == "torch" or (
        backend == "triton" and needs_grad
        and not _use_fused(strategy, active_rows.numel() if active_rows is not None else N, D, V)
    ))
    if use_chunked:
        copts = ChunkedOptions(
            softcap=softcap, temperature=float(temperature), label_smoothing=eps, z_loss=zl, want_smooth=eps > 0,
            workspace_bytes=workspace_bytes, weight_grad_accumulation=weight_grad_accumulation,
            row_impl="triton" if backend == "triton" else "torch",
        )
        idx = active_row_index(active, active_rows)
        lse = None
        if needs_grad and reduction != "none" and not return_lse:
            # gradient in the forward: per-token coefficient of the reduced loss, w_i / denominator, on device
            coef = (w.float() if w is not None else torch.ones(N, dtype=torch.float32, device=device)) * active
            if reduction == "mean":
                coef = coef / denominator(torch.float32)
            loss = chunked_cross_entropy(h2, weight, bias, y, coef, idx, copts)
        else:  # per-token statistics (stored LSE, recompute backward when a gradient is needed)
            nll, lse, smooth, _ = chunked_token_stats(h2, weight, bias, y, idx, copts)
            loss = _reduce(_ce_per_token(nll, smooth, lse, eps, zl), w, reduction, denominator)
    else:
        sopts = StatsOptions(
            ignore_index=ignore_index, softcap=softcap, temperature=float(temperature), want_sumz=eps > 0
        )
        lse, nll, sumz, _ = _token_stats(h2, weight, bias, y, sopts, backend, vp)
        vocab = vp.vocab_size if vp is not None else V
        # fp32 (fp64 for fp64 inputs); 0 at inactive rows
        per_tok = _ce_per_token(nll, lse - sumz / vocab if eps > 0 else None, lse, eps, zl)
        loss = _reduce(per_tok, w, reduction, denominator)

    if reduction == "none":
        loss = loss.reshape(out_shape)
        if shift:
            loss = loss[..., :n_scored]
    if not return_lse:
        return loss
    lse = lse.reshape(out_shape)
    if shift:
        lse = lse[..., :n_scored]
    return loss, lse


# --------------------------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------------------------


@_autocast_entry
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_lse: bool = False,
    impl: str = "auto",
    strategy: str = "auto",
    active_rows: torch.Tensor | None = None,
    workspace_bytes: int | None = None,
    vocab_parallel: VocabParallel | None = None,
) -> TokenLogprobs:
    """Per-token ``log p(targets)`` (and optionally entropy and LSE) from hidden states and the LM-head weight.

    ``z = cap(hidden @ weight.T + bias) / temperature``; ``logprob = z_y − lse``; ``entropy = −Σ p log p``.

    Args:
        hidden: ``[..., D]`` fp16 / bf16 / fp32. weight: ``[V, D]`` same dtype. targets: ``[...]`` integer.
        bias, ignore_index, softcap, temperature: as :func:`linear_cross_entropy`.
        return_entropy / return_lse: also return the entropy / LSE of the transformed distribution.
        impl: ``"auto" | "triton" | "reference"`` (``"auto"``: Triton on CUDA, the chunked PyTorch path on CPU).
        strategy, active_rows, workspace_bytes: as :func:`linear_cross_entropy` (with gradients the chunked path
            stores the per-token LSE / entropy and recomputes the logits in GEMM-bound chunks in the backward).
        vocab_parallel: the weight is this rank's vocabulary shard, as :func:`linear_cross_entropy`.

    Returns:
        :class:`TokenLogprobs` ``(logprob, entropy, lse)`` of fp32 ``[...]`` tensors (``entropy`` / ``lse`` are
        ``None`` unless asked for; every output is 0 at ignored positions). Differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias`` for arbitrary upstream gradients of all returned outputs at once. Under
        ``torch.no_grad`` it is a single forward pass that stores nothing (the Δc_t profiler's kernel): the fused
        Triton kernel on CUDA, the chunked statistics sweep on CPU (one bounded workspace).

    Examples:
        >>> import torch
        >>> h = torch.randn(3, 4, 8); W = torch.randn(11, 8); y = torch.randint(0, 11, (3, 4))
        >>> out = token_logprobs(h, W, y, return_entropy=True)
        >>> out.logprob.shape, out.entropy.shape
        (torch.Size([3, 4]), torch.Size([3, 4]))
    """
    fn = "token_logprobs"
    weight, bias, vp = resolve_vocab_parallel(weight, bias, vocab_parallel, fn)
    V, D = _validate(
        hidden, weight, targets, bias, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
        impl=impl, fn=fn, vocab_size=vp.vocab_size if vp is not None else None,
    )
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    _check_chunked_args(fn, active_rows, workspace_bytes, "fp32", hidden.device)
    backend = _backend(impl, hidden.device)
    shape = tuple(targets.shape)
    h2, y = hidden.reshape(-1, D), targets.reshape(-1)
    N = h2.shape[0]
    if hidden.dtype == torch.float64 or N == 0:
        backend = "reference"
    needs_grad = _needs_grad(hidden, weight, bias)
    use_chunked = vp is None and not torch.compiler.is_compiling() and (backend == "torch" or (
        backend == "triton" and needs_grad
        and not _use_fused(strategy, active_rows.numel() if active_rows is not None else N, D, V)
    ))
    if use_chunked:
        copts = ChunkedOptions(
            softcap=softcap, temperature=float(temperature), want_entropy=bool(return_entropy),
            workspace_bytes=workspace_bytes, row_impl="triton" if backend == "triton" else "torch",
        )
        idx = active_row_index(y != ignore_index, active_rows)
        nll, lse, _, ent = chunked_token_stats(h2, weight, bias, y, idx, copts)
    else:
        sopts = StatsOptions(ignore_index=ignore_index, softcap=softcap, temperature=float(temperature),
                             want_sumz=False, want_entropy=bool(return_entropy))
        lse, nll, _, ent = _token_stats(h2, weight, bias, y, sopts, backend, vp)
    logprob = (-nll).reshape(shape)
    return TokenLogprobs(
        logprob,
        ent.reshape(shape) if return_entropy else None,
        lse.reshape(shape) if return_lse else None,
    )
