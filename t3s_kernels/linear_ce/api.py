"""Public functionals: :func:`linear_cross_entropy` and :func:`token_logprobs`.

Both are thin torch-level combinations of one per-token primitive (``lse``, target logit, ``Σz``, entropy, all
fp32) computed straight from the hidden states and the LM-head weight without materialising ``[N, V]`` logits.
This module validates arguments, flattens ``[..., D]`` to ``[N, D]``, picks the backend (``impl``) and the
strategy, and does the reductions in PyTorch.

Numerics: fp16 / bf16 / fp32 inputs (hidden and weight of the same dtype, or fp32 master weights with a half
``compute_dtype``, which ``torch.autocast`` sets), fp32 logit accumulation, fp32 LSE, target logit from the same
accumulator as the LSE (so the cross-entropy is never negative); the weight gradient follows the dW contract of
:mod:`.chunked`. fp64 inputs run the reference in fp64.

The path is one way: this module validates (:mod:`._checks`) and documents; :mod:`.dispatch` chooses the strategy
and reduces; :mod:`.function` holds the autograd Functions; :mod:`.chunked` drives the sweep; :mod:`.kernels` runs.

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
from typing import NamedTuple

import torch

from . import _checks, _docs
from . import ops as _ops  # registers the torch.library ops used under torch.compile
from .dispatch import LossCall, linear_cross_entropy_eager, token_logprobs_forward
from .function import linear_token_stats
from .vocab_parallel import VocabParallel, resolve_vocab_parallel

__all__ = ["TokenLogprobs", "VocabParallel", "linear_cross_entropy", "token_logprobs"]

REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "fused", "chunked")


class TokenLogprobs(NamedTuple):
    """Per-token outputs of :func:`token_logprobs`, fp32 with the shape of ``targets`` (0 at ignored positions).

    ``accuracy`` (``return_accuracy=True``; else ``None``) is an attribute, not a tuple field, so code that
    unpacks or iterates the three outputs is unchanged: 1.0 where the target logit is the row's maximum (ties
    count as correct), else 0.0."""

    logprob: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None
    accuracy = None  # class default; :class:`_TokenLogprobsWithAccuracy` instances carry their own


class _TokenLogprobsWithAccuracy(TokenLogprobs):
    """A :class:`TokenLogprobs` carrying the ``accuracy`` attribute."""

    def __new__(cls, logprob, entropy, lse, accuracy):
        self = super().__new__(cls, logprob, entropy, lse)
        self.accuracy = accuracy
        return self


def _autocast_entry(fn):
    """Under ``torch.autocast``: the call computes in the autocast dtype (``compute_dtype``, unless the caller set
    one): ``hidden`` is cast to it, an fp32 weight is passed through as it is (the op reads it rounded to the
    compute dtype and accumulates its gradient in fp32, exactly), a weight of another half dtype is cast; then the
    call runs with autocast off so the internal matmuls keep their fp32 accumulation. Else: unchanged."""

    @functools.wraps(fn)
    def wrapper(hidden, weight, targets, **kwargs):
        if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor):
            dev = hidden.device.type
            if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
                dtype = torch.get_autocast_dtype(dev)
                if kwargs.get("compute_dtype") is None and hidden.dtype != torch.float64:
                    kwargs["compute_dtype"] = dtype
                if weight.dtype in (torch.float16, torch.bfloat16) and weight.dtype != dtype:
                    weight = weight.to(dtype)
                with torch.autocast(dev, enabled=False):
                    return fn(hidden, weight, targets, **kwargs)
        return fn(hidden, weight, targets, **kwargs)

    return wrapper


def _stats_fn():
    """The per-token primitive: the custom op ``t3s::token_stats`` while ``torch.compile`` traces, else eager."""
    return _ops.token_stats if torch.compiler.is_compiling() else linear_token_stats


def _check_loss_options(fn, reduction, strategy, label_smoothing, z_loss) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(label_smoothing, (int, float)) or not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"{fn}: label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not (0.0 <= z_loss < float("inf")):
        raise ValueError(f"{fn}: z_loss must be a finite float >= 0, got {z_loss!r}")


# --------------------------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------------------------


@_autocast_entry
@_docs.documented(_docs.LINEAR_CROSS_ENTROPY)
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
    weight_grad_accumulation: str = "weight_dtype",
    compute_dtype: torch.dtype | None = None,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    fn = "linear_cross_entropy"
    hidden = _checks.resolve_compute_dtype(hidden, weight, compute_dtype, fn)
    weight, bias, vp = resolve_vocab_parallel(weight, bias, vocab_parallel, fn)
    V, D = _checks.validate_inputs(
        hidden, weight, targets, bias, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
        impl=impl, fn=fn, vocab_size=vp.vocab_size if vp is not None else None, master_ok=compute_dtype is not None,
    )
    _check_loss_options(fn, reduction, strategy, label_smoothing, z_loss)
    signed_ok = reduction != "mean" or normalizer is not None  # mean without normaliser: Σ wᵢ is the denominator
    if token_weight is not None:
        _checks.check_token_weight(token_weight, targets, fn, signed_ok=signed_ok)
    if class_weight is not None:
        _checks.check_class_weight(class_weight, V, hidden.device, label_smoothing=float(label_smoothing),
                                   signed_ok=signed_ok, fn=fn)
    if normalizer is not None:
        _checks.check_normalizer(normalizer, reduction, fn)
    _checks.check_chunked_args(fn, active_rows, workspace_bytes, weight_grad_accumulation, hidden.device)
    shift = _checks.check_shift(shift, targets, fn)
    if (torch.compiler.is_compiling() and vp is None and reduction != "none" and not return_lse
            and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        # the compiled graph calls this whole function as one custom op (t3s::lce_reduced)
        return _ops.lce_reduced(
            hidden, weight, targets, bias=bias, token_weight=token_weight, class_weight=class_weight,
            ignore_index=ignore_index, reduction=reduction, normalizer=normalizer, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, temperature=temperature, shift=shift, impl=impl, strategy=strategy,
            active_rows=active_rows, workspace_bytes=workspace_bytes, weight_grad_accumulation=weight_grad_accumulation,
        )
    call = LossCall(reduction, float(label_smoothing), float(z_loss), softcap, float(temperature), bool(return_lse),
                    impl, strategy, workspace_bytes, weight_grad_accumulation, ignore_index)
    return linear_cross_entropy_eager(
        hidden, weight, targets, bias, call, token_weight=token_weight, class_weight=class_weight,
        normalizer=normalizer, shift=shift, active_rows=active_rows, vp=vp, stats_fn=_stats_fn(), fn=fn,
    )


# --------------------------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------------------------


@_autocast_entry
@_docs.documented(_docs.TOKEN_LOGPROBS)
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
    return_accuracy: bool = False,
    impl: str = "auto",
    strategy: str = "auto",
    active_rows: torch.Tensor | None = None,
    workspace_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
    vocab_parallel: VocabParallel | None = None,
) -> TokenLogprobs:
    fn = "token_logprobs"
    hidden = _checks.resolve_compute_dtype(hidden, weight, compute_dtype, fn)
    weight, bias, vp = resolve_vocab_parallel(weight, bias, vocab_parallel, fn)
    _checks.validate_inputs(
        hidden, weight, targets, bias, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
        impl=impl, fn=fn, vocab_size=vp.vocab_size if vp is not None else None, master_ok=compute_dtype is not None,
    )
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    _checks.check_chunked_args(fn, active_rows, workspace_bytes, "fp32", hidden.device)
    shape = tuple(targets.shape)
    logprob, ent, lse, acc = token_logprobs_forward(
        hidden, weight, bias, targets.reshape(-1), ignore_index=ignore_index, softcap=softcap,
        temperature=temperature, return_entropy=return_entropy, return_accuracy=bool(return_accuracy), impl=impl,
        strategy=strategy,
        active_rows=active_rows, workspace_bytes=workspace_bytes, vp=vp, stats_fn=_stats_fn(),
    )
    outs = (logprob.reshape(shape), ent.reshape(shape) if return_entropy else None,
            lse.reshape(shape) if return_lse else None)
    if return_accuracy:
        return _TokenLogprobsWithAccuracy(*outs, acc.reshape(shape))
    return TokenLogprobs(*outs)
