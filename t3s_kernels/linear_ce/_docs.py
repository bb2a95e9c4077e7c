"""The documentation of the public functionals, kept apart from their code (:mod:`.api` validates and hands
over to :mod:`.dispatch`); :func:`documented` attaches it, so ``help()``, Sphinx and doctest see it as usual."""

from __future__ import annotations

__all__ = ["LINEAR_CROSS_ENTROPY", "TOKEN_LOGPROBS", "documented"]


def documented(doc: str):
    """Decorator: set the function's ``__doc__`` to ``doc``."""

    def attach(fn):
        fn.__doc__ = doc
        return fn

    return attach


LINEAR_CROSS_ENTROPY = """\
Cross-entropy of ``softmax(cap(hidden @ weight.T + bias) / temperature)`` without ``[N, V]`` logits.

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


TOKEN_LOGPROBS = """\
Per-token ``log p(targets)`` (and optionally entropy and LSE) from hidden states and the LM-head weight.

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
