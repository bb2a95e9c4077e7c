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

from . import _checks
from . import ops as _ops  # registers the torch.library ops used under torch.compile
from .dispatch import LossCall, linear_cross_entropy_eager, token_logprobs_forward
from .function import linear_token_stats
from .vocab_parallel import VocabParallel, resolve_vocab_parallel

__all__ = ["TokenLogprobs", "VocabParallel", "linear_cross_entropy", "token_logprobs"]

REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "fused", "chunked")


class TokenLogprobs(NamedTuple):
    """Per-token outputs of :func:`token_logprobs`, fp32 with the shape of ``targets`` (0 at ignored positions);
    ``accuracy`` is 1.0 where the target logit is the row's maximum (ties count as correct), else 0.0."""

    logprob: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None
    accuracy: torch.Tensor | None = None


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
    """Cross-entropy of ``softmax(cap(hidden @ weight.T + bias) / temperature)`` without ``[N, V]`` logits.

    Per token ``i`` (``z`` = transformed logits, ``ε`` = ``label_smoothing``)::

        loss_i = (1 − ε)(lse_i − z_{i, y_i}) + ε(lse_i − Σ_v z_{i,v} / V) + z_loss · lse_i²

    Args:
        hidden: ``[..., D]`` fp16 / bf16 / fp32 (fp64 runs the reference). Need not be contiguous.
        weight: ``[V, D]``, same dtype as ``hidden`` (the LM-head weight), or fp32 with ``compute_dtype``.
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
            recompute in the backward (10·n·D·V). ``"auto"`` (default): the cost rule ``FUSED_MAX_FLOPS`` of
            :mod:`.dispatch` — fused only for tiny calls, chunked at every LLM shape. Calls that need no gradient
            pick the fused forward kernel or the statistics sweep by
            :func:`~t3s_kernels.linear_ce.dispatch.forward_uses_sweep` on the Triton backend (the sweep above a
            tiny size), the sweep on the PyTorch one.
        active_rows: optional 1-D int64 tensor of the rows of ``hidden.reshape(-1, D)`` that are scored (after
            ``shift = k``: row ``t`` is scored when ``targets[..., t + k]`` is not ``ignore_index`` and its
            weight is not 0), each exactly once, on ``hidden``'s device. The chunked path gathers these rows
            only; handing the index over (e.g. built on the host with the batch) avoids its one host read of the
            active count on CUDA (without it ``nonzero`` is used: one sync per call on CUDA, free on CPU).
            Checked: eagerly on CPU, device-side (no sync) on CUDA.
        workspace_bytes: memory budget of the chunked path's reusable workspace (default: 768 MiB on CUDA, 256 MiB
            on CPU; env ``T3S_WORKSPACE_BYTES``); see :mod:`t3s_kernels.linear_ce.chunked` for the chunk plan.
        weight_grad_accumulation: the dW contract (measured errors: :mod:`t3s_kernels.linear_ce.chunked`).
            fp32 weights (master weights under ``compute_dtype`` / autocast included): ``dW`` accumulates in fp32
            straight into the fp32 gradient returned, exact, either value. bf16 / fp16 weights:
            ``"weight_dtype"`` (default, as Liger-Kernel and ``F.linear_cross_entropy``) accumulates in the
            weight's dtype, each super-chunk's GEMM summing its rows in fp32, no workspace; ``"fp32"`` (opt-in)
            holds an fp32 ``[V, D]`` accumulator (V·D·4 bytes, 2.5 GB at V = 151936, D = 4096) and casts it once.
        compute_dtype: ``None`` (default: ``hidden``'s dtype; ``weight`` must match) or fp16 / bf16 / fp32: the
            GEMM dtype. ``hidden`` is cast to it; ``weight`` may be of that dtype or fp32 master weights, which
            are read rounded to it and get an exact fp32 gradient. ``torch.autocast`` sets it to the autocast
            dtype.
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
    """Per-token ``log p(targets)`` (and optionally entropy and LSE) from hidden states and the LM-head weight.

    ``z = cap(hidden @ weight.T + bias) / temperature``; ``logprob = z_y − lse``; ``entropy = −Σ p log p``.

    Args:
        hidden: ``[..., D]`` fp16 / bf16 / fp32. weight: ``[V, D]`` same dtype. targets: ``[...]`` integer.
        bias, ignore_index, softcap, temperature: as :func:`linear_cross_entropy`.
        return_entropy / return_lse: also return the entropy / LSE of the transformed distribution.
        return_accuracy: also return the per-token accuracy (Liger-Kernel's ``return_token_accuracy``): 1.0 where
            ``z_y`` equals the row's maximum transformed logit — a target tied for the maximum counts as correct
            (``argmax`` would pick the first of the tied classes) — else 0.0, 0 at ignored positions; fp32, no
            gradient. It comes from the same sweep as the log-probs (no extra GEMM), so it needs the chunked path
            (``impl`` ``"auto"`` / ``"triton"``, not ``strategy="fused"``, no vocabulary parallelism, not under
            ``torch.compile``; else ``ValueError``).
        impl: ``"auto" | "triton" | "reference"`` (``"auto"``: Triton on CUDA, the chunked PyTorch path on CPU).
        strategy, active_rows, workspace_bytes, compute_dtype: as :func:`linear_cross_entropy` (with gradients the
            chunked path stores the per-token LSE / entropy and recomputes the logits in GEMM-bound chunks in the
            backward; without, :func:`~t3s_kernels.linear_ce.dispatch.forward_uses_sweep` picks the forward).
        vocab_parallel: the weight is this rank's vocabulary shard, as :func:`linear_cross_entropy`.

    Returns:
        :class:`TokenLogprobs` ``(logprob, entropy, lse)`` of fp32 ``[...]`` tensors (``entropy`` / ``lse`` are
        ``None`` unless asked for; every output is 0 at ignored positions). Differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias`` for arbitrary upstream gradients of all returned outputs at once. Under
        ``torch.no_grad`` it is a single forward pass that stores nothing (the Δc_t profiler's call): on CUDA the
        cuBLAS statistics sweep above the cost rule's threshold (every LLM-sized call), the fused Triton kernel
        for tiny calls; the sweep on CPU (one bounded workspace).

    Examples:
        >>> import torch
        >>> h = torch.randn(3, 4, 8); W = torch.randn(11, 8); y = torch.randint(0, 11, (3, 4))
        >>> out = token_logprobs(h, W, y, return_entropy=True)
        >>> out.logprob.shape, out.entropy.shape
        (torch.Size([3, 4]), torch.Size([3, 4]))
    """
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
    return TokenLogprobs(
        logprob.reshape(shape),
        ent.reshape(shape) if return_entropy else None,
        lse.reshape(shape) if return_lse else None,
        acc.reshape(shape) if return_accuracy else None,
    )
