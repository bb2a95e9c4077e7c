"""Block-diffusion (dLLM) SFT and dLLM T3S: one training step and a small training loop.

One step (``research/anchors_block_diffusion.md`` §6-§8; BD3-LM / LLaDA2.0 conventions, switches explicit):

1. :func:`~t3s_kernels.block_diffusion_union_mask` draws the noisy half: per block (or per sequence) a noise level
   ``t``, random mask ``m = (u < t) ∧ response``, union ``m' = m ∨ (target ∧ response)``; loss weights per token
   and a class code per token. Default weighting ``uniform`` = the paper's Eq. 10, an unweighted sum of the
   reconstruction loss over ``m'``: a target is masked at every step, a non-target with probability ``t``, so in
   expectation a target weighs ``1 / E[t]`` times a random token (1.82x at dFactory's ``t ∈ [0.3, 0.8]``, 2x at
   ``[1e-3, 1]``). Options: ``t3s_split`` (random non-targets ``1/t`` (ELBO), targets ``λ``: in expectation
   targets then weigh about the same as random masks) and ``elbo_naive`` (``1/t`` on everything).
2. The model sees ``[x_t ‖ x_0]`` (length ``2L``) with position ids ``[pos ‖ pos]`` (document-relative) and the 2L
   block-diffusion attention mask (noisy↔noisy within a block, noisy → strictly earlier clean blocks, clean →
   clean block-causal, never across documents): a boolean 4D mask for ``sdpa``, an additive float mask for
   ``eager``, a FlexAttention ``BlockMask`` for ``flex_attention``.
3. Only the x_t half's last hidden states go to :func:`~t3s_kernels.linear_cross_entropy` with the model's own
   LM-head weight, ``targets = x_0`` (same-position labels, no shift) and ``token_weight`` = the kernel's loss
   weights: the ``[tokens × vocab]`` logits never exist and the model's ``lm_head`` is never called.
4. The weighted sum is divided by a normaliser (a device tensor, exact under gradient accumulation):
   ``token`` (default) = response tokens of the whole optimizer step; ``sequence`` = each document's sum divided
   by its response length, then by the number of documents of the step; ``masked`` = ``|m'|`` of the step.

The uniforms are keyed by (seed, optimizer step, global token index of the token in the step's global batch):
splitting a step into micro-batches, or over ranks, draws the same masks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from t3s.generate import Completion, GenerationBackend
from t3s.schedule import lr_scheduler
from t3s_kernels import linear_cross_entropy
from t3s_kernels.block_diffusion import (
    FORCED,
    RANDOM,
    RANDOM_TARGET,
    UnionMaskOutput,
    block_diffusion_attention_mask,
    block_diffusion_block_mask,
    block_diffusion_union_mask,
    document_ids_from_cu_seqlens,
    position_ids_from_document_ids,
)
from t3s_kernels.hf import FusedLossCausalLM

__all__ = [
    "CLASSES",
    "DLLMConfig",
    "DiffusionBackend",
    "PreparedBatch",
    "StepOutput",
    "dllm_loss",
    "diffusion_generate",
    "dllm_train_step",
    "prepare_dllm_batch",
    "step_normalizer",
    "train_dllm",
]

IGNORE_INDEX = -100
NORMALIZATIONS = ("token", "sequence", "masked")
CLASSES = {"random": RANDOM, "target": RANDOM_TARGET, "forced": FORCED}


@dataclass
class DLLMConfig:
    """Options of the block-diffusion step (``cfg.dllm.*`` in the YAML config).

    Attributes:
        mask_token_id: id of ``[MASK]`` (LLaDA2.0: 156895). ``None``: the tokenizer's ``mask_token_id``.
        block_size: diffusion block size (LLaDA2.0: 32).
        eps_min, eps_max: noise-level window (BD3-LM ``[1e-3, 1]``; dFactory LLaDA2.0 SFT ``[0.3, 0.8]``).
        t_mode: ``per_block`` (BD3-LM) or ``per_sequence`` (LLaDA2.0 / dFactory).
        sampler: ``stratified_perm`` | ``bd3lm`` | ``iid``.
        weight_mode: ``uniform`` (default: the paper's Eq. 10, 1 on every token of the union mask) | ``t3s_split``
            (random 1/t, targets ``target_weight``) | ``elbo_naive`` (1/t on every masked token).
        target_weight: λ.
        normalization: ``token`` (default) | ``sequence`` | ``masked``.
        seed: Philox key of the masks (the optimizer step is the other half of the key).
        tau: target threshold of dLLM T3S (``B = {Δc < −tau}``, used by the selector; recorded here).
        impl: backend of the union mask and of the loss (``auto`` | ``triton`` | ``reference``).
    """

    mask_token_id: int | None = None
    block_size: int = 32
    eps_min: float = 1e-3
    eps_max: float = 1.0
    t_mode: str = "per_block"
    sampler: str = "stratified_perm"
    weight_mode: str = "uniform"
    target_weight: float = 1.0
    normalization: str = "token"
    seed: int = 0
    tau: float = 0.2
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"dllm.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"dllm.block_size must be a positive int, got {self.block_size!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> DLLMConfig:
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown dllm option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class PreparedBatch:
    """A micro-batch ready for the model: the 2L input, its mask and the union-mask outputs."""

    input_ids: torch.Tensor  # [B, L] clean ids x_0
    model_input_ids: torch.Tensor  # [B, 2L] [x_t ‖ x_0]
    position_ids: torch.Tensor  # [B, 2L] [pos ‖ pos], document-relative
    document_ids: torch.Tensor  # [B, L] int64, pads own documents
    attention_mask: Any  # [B, 1, 2L, 2L] bool / float, or a BlockMask
    union: UnionMaskOutput
    maskable: torch.Tensor  # [B, L] bool (labels != -100)
    token_doc: torch.Tensor  # [B*L] int64 document index of each token (−1 outside documents)
    n_docs: int
    active_rows: torch.Tensor | None = None  # [n] int64 flat indices of the tokens with a nonzero loss weight

    @property
    def n_response(self) -> torch.Tensor:
        return self.maskable.sum()

    @property
    def n_union(self) -> torch.Tensor:
        return self.union.doc_counts[:, 2].sum()

    @property
    def n_sequences(self) -> torch.Tensor:
        return (self.union.doc_counts[:, 0] > 0).sum()


@dataclass
class StepOutput:
    """Loss of one micro-batch (already divided by the normaliser) and device-tensor statistics."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    prepared: PreparedBatch | None = None


def _attn_impl(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    return impl


def _build_attention_mask(impl: str, block_size: int, doc: torch.Tensor, dtype: torch.dtype):
    if impl == "flex_attention":
        return block_diffusion_block_mask(block_size, document_ids=doc, device=doc.device)
    dense = block_diffusion_attention_mask(block_size, document_ids=doc)[:, None]  # [B, 1, 2L, 2L]
    if impl == "sdpa":
        return dense
    if impl == "eager":
        return torch.zeros(dense.shape, dtype=dtype, device=doc.device).masked_fill_(~dense, torch.finfo(dtype).min)
    raise ValueError(
        f"block diffusion needs an attention implementation that takes an arbitrary mask: 'sdpa', 'eager' or "
        f"'flex_attention'; the model uses {impl!r} (set attn_implementation when loading it)"
    )


def prepare_dllm_batch(
    batch: dict,
    cfg: DLLMConfig,
    *,
    step: int,
    token_offset: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> PreparedBatch:
    """Draw the union mask for one micro-batch and build the model inputs.

    Args:
        batch: padded ``{"input_ids" [B, L], "labels" [B, L] (−100 on prompt / pad), "attention_mask" [B, L],
            "target_mask" [B, L] bool (optional)}``, or packed (``t3s.data.PackedBatch`` fields as a dict or the
            object itself: ``input_ids`` ``[1, T]``, ``labels``, ``cu_seqlens``, ``target_mask``).
        cfg: :class:`DLLMConfig`. step: the optimizer step (keys the masks).
        token_offset: global index of this micro-batch's first token within the step (sum of ``B·L`` of the
            micro-batches before it, over all ranks).
        attn_implementation: the model's (``sdpa`` | ``eager`` | ``flex_attention``). dtype: of an eager mask.
    """
    if not isinstance(batch, dict):
        keys = ("input_ids", "labels", "cu_seqlens", "target_mask")
        batch = {k: getattr(batch, k) for k in keys if hasattr(batch, k)}
    if cfg.mask_token_id is None:
        raise ValueError("dllm.mask_token_id is required (the tokenizer has no mask_token_id)")
    ids = batch["input_ids"]
    dev = torch.device(device) if device is not None else ids.device
    # the mask is drawn where the batch was born (the host, for a data loader's batch), so the count of its
    # active rows is a host value: the loss then reads nothing back from the device (no sync per micro-batch)
    host = ids.device
    if ids.dim() != 2:
        raise ValueError(f"batch['input_ids'] must be [B, L], got {tuple(ids.shape)}")
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("batch['labels'] is required (-100 on prompt and pad marks what is never masked)")
    labels = labels.to(host)
    if labels.shape != ids.shape:
        raise ValueError(f"batch['labels'] must have shape {tuple(ids.shape)}, got {tuple(labels.shape)}")
    maskable = labels != IGNORE_INDEX
    targets = batch.get("target_mask")
    targets = targets.to(host).bool() if targets is not None else None
    B, L = ids.shape
    cu = batch.get("cu_seqlens")
    common = dict(
        block_size=cfg.block_size, mask_token_id=int(cfg.mask_token_id), eps_min=cfg.eps_min, eps_max=cfg.eps_max,
        t_mode=cfg.t_mode, sampler=cfg.sampler, weight_mode=cfg.weight_mode, target_weight=cfg.target_weight,
        seed=cfg.seed, step=step, token_offset=token_offset,
        impl="auto" if cfg.impl == "triton" and host.type != "cuda" else cfg.impl,  # same mask on every backend
    )  # fmt: skip
    if cu is not None:
        if B != 1:
            raise ValueError("a packed batch (cu_seqlens) must have input_ids of shape [1, T]")
        cu = cu.to(host).to(torch.int64)
        out = block_diffusion_union_mask(
            ids[0], maskable[0], targets=None if targets is None else targets[0], cu_seqlens=cu, **common
        )
        out = out._replace(
            noisy_ids=out.noisy_ids.view(1, L), loss_weight=out.loss_weight.view(1, L), code=out.code.view(1, L)
        )
        doc = document_ids_from_cu_seqlens(cu, L).to(torch.int64)
        n_docs = cu.numel() - 1
        token_doc = doc.view(-1).clone()
        token_doc[token_doc >= n_docs] = -1
    else:
        valid = batch.get("attention_mask")
        valid = valid.to(host).bool() if valid is not None else torch.ones_like(maskable)
        out = block_diffusion_union_mask(ids, maskable, targets=targets, valid=valid, **common)
        doc = torch.where(valid, 0, -1 - torch.arange(L, device=host)).to(torch.int64)
        doc = doc + torch.zeros(B, 1, dtype=torch.int64, device=host)
        n_docs = B
        token_doc = torch.arange(B, device=host).repeat_interleave(L)
    pos = position_ids_from_document_ids(doc)
    active_rows = torch.nonzero(out.loss_weight.reshape(-1) != 0).reshape(-1)  # a device sync unless host is CPU
    ids, maskable, doc, pos, token_doc, active_rows = (
        t.to(dev) for t in (ids, maskable, doc, pos, token_doc, active_rows))
    out = type(out)(*(t.to(dev) if isinstance(t, torch.Tensor) else t for t in out))
    mask = _build_attention_mask(attn_implementation, cfg.block_size, doc, dtype)
    return PreparedBatch(
        input_ids=ids,
        model_input_ids=torch.cat([out.noisy_ids, ids], dim=1),
        position_ids=torch.cat([pos, pos], dim=1),
        document_ids=doc,
        attention_mask=mask,
        union=out,
        maskable=maskable,
        token_doc=token_doc,
        n_docs=n_docs,
        active_rows=active_rows,
    )


def step_normalizer(prepared: Sequence[PreparedBatch], mode: str) -> torch.Tensor:
    """The normaliser of one optimizer step from all its micro-batches (all-reduce it across ranks yourself).

    ``token``: response tokens; ``sequence``: documents with at least one response token; ``masked``: ``|m'|``.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    if mode == "token":
        vals = [p.n_response for p in prepared]
    elif mode == "sequence":
        vals = [p.n_sequences for p in prepared]
    else:
        vals = [p.n_union for p in prepared]
    return torch.stack([v.to(torch.float32) for v in vals]).sum()


def _adapter(model: nn.Module) -> FusedLossCausalLM:
    return model if isinstance(model, FusedLossCausalLM) else FusedLossCausalLM(model)


def x_t_hidden_states(model: nn.Module, prepared: PreparedBatch) -> torch.Tensor:
    """The trunk's last hidden states of the x_t half, ``[B, L, D]`` (the LM head is not applied)."""
    lm = _adapter(model)
    L = prepared.input_ids.shape[1]
    hidden = lm.hidden_states(
        input_ids=prepared.model_input_ids, attention_mask=prepared.attention_mask,
        position_ids=prepared.position_ids,
    )  # fmt: skip
    return hidden[:, :L]


def dllm_loss(model: nn.Module, prepared: PreparedBatch, cfg: DLLMConfig, normalizer: torch.Tensor) -> StepOutput:
    """Forward of one prepared micro-batch: fused weighted CE on the x_t half, divided by ``normalizer``."""
    lm = _adapter(model)
    hidden = x_t_hidden_states(lm, prepared)
    h, weight, bias = lm._head_tensors(hidden)
    w = prepared.union.loss_weight
    per_token = linear_cross_entropy(
        h, weight, prepared.input_ids, bias=bias, token_weight=w, reduction="none",
        softcap=lm.softcap, temperature=lm.temperature, impl=cfg.impl, active_rows=prepared.active_rows,
    )  # [B, L] w_i · CE_i   # fmt: skip
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=per_token.device)
    if cfg.normalization == "sequence":
        n_docs = prepared.n_docs
        flat = per_token.reshape(-1)
        keep = prepared.token_doc >= 0  # tokens outside documents add an exact 0 (no boolean indexing: no sync)
        doc_sum = torch.zeros(n_docs, dtype=flat.dtype, device=flat.device).index_add(
            0, prepared.token_doc.clamp_min(0), torch.where(keep, flat, torch.zeros_like(flat))
        )
        n_resp = prepared.union.doc_counts[:, 0].to(flat.dtype)
        total = torch.where(n_resp > 0, doc_sum / n_resp.clamp_min(1), torch.zeros_like(doc_sum)).sum()
    else:
        total = per_token.sum()
    loss = torch.where(normalizer > 0, total / normalizer.clamp_min(1e-30), torch.zeros_like(total))
    stats = _class_stats(per_token.detach(), w, prepared.union.code)
    stats["loss_sum"] = total.detach()
    return StepOutput(loss=loss, stats=stats, prepared=prepared)


def _class_stats(per_token: torch.Tensor, w: torch.Tensor, code: torch.Tensor) -> dict[str, torch.Tensor]:
    ce = torch.where(w > 0, per_token / w.clamp_min(1e-30), torch.zeros_like(per_token))
    stats = {}
    for name, c in CLASSES.items():
        sel = code == c
        n = sel.sum()
        stats[f"n_{name}"] = n
        stats[f"ce_sum_{name}"] = (ce * sel).sum()
    return stats


def dllm_train_step(
    model: nn.Module,
    batch: dict,
    cfg: DLLMConfig,
    *,
    step: int = 0,
    normalizer: torch.Tensor | float | None = None,
    token_offset: int = 0,
) -> StepOutput:
    """Union mask + 2L forward + fused loss for one micro-batch (call ``.loss.backward()`` yourself).

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM``, ``Qwen3ForCausalLM``, …, attention ``sdpa`` /
            ``eager`` / ``flex_attention``) or a :class:`~t3s_kernels.FusedLossCausalLM` around one.
        batch: see :func:`prepare_dllm_batch`.
        cfg: :class:`DLLMConfig`.
        step: optimizer step (keys the masks). token_offset: this micro-batch's first global token in the step.
        normalizer: the step's normaliser (:func:`step_normalizer` over all its micro-batches); ``None``: this
            micro-batch's own (a single-micro-batch step).

    Returns:
        :class:`StepOutput`: ``loss`` (scalar, differentiable), ``stats`` (device tensors: ``n_random``,
        ``n_target`` (random ∧ target), ``n_forced`` and the matching ``ce_sum_*`` — mean CE of a class is
        ``ce_sum / n``), ``prepared``.
    """
    lm = _adapter(model)
    param = next(lm.model.parameters())
    prepared = prepare_dllm_batch(
        batch, cfg, step=step, token_offset=token_offset, attn_implementation=_attn_impl(lm.model),
        dtype=param.dtype, device=param.device,
    )  # fmt: skip
    if normalizer is None:
        normalizer = step_normalizer([prepared], cfg.normalization)
    return dllm_loss(lm, prepared, cfg, normalizer)


def _summarise(stats: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in CLASSES:
        n = sum(float(s[f"n_{name}"]) for s in stats)
        ce = sum(float(s[f"ce_sum_{name}"]) for s in stats)
        out[f"n_{name}"] = n
        out[f"ce_{name}"] = ce / n if n > 0 else float("nan")
    return out


def resolve_dllm_config(cfg: DLLMConfig | dict | None, tokenizer=None) -> DLLMConfig:
    """``cfg`` as a :class:`DLLMConfig` with ``mask_token_id`` filled from the tokenizer when unset.

    Raises ``ValueError`` when neither gives a mask token, so callers can check before creating any output.
    """
    cfg = cfg if isinstance(cfg, DLLMConfig) else DLLMConfig.from_dict(cfg)
    if cfg.mask_token_id is None:
        mid = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
        if mid is None:
            raise ValueError("dllm.mask_token_id is not set and the tokenizer has no mask_token_id; set "
                             "dllm.mask_token_id=<id of an unused token>")
        cfg = DLLMConfig(**{**asdict(cfg), "mask_token_id": int(mid)})
    return cfg


def _prepare_step(batch_examples: list, cfg: DLLMConfig, *, step: int, micro: int, pad_id: int, attn: str,
                  param: torch.Tensor) -> list:
    """Collate one optimizer step's examples into micro-batches and noise them (token offsets run across the step)."""
    from t3s.data import collate

    prepared, offset = [], 0
    for i in range(0, len(batch_examples), micro):
        batch = collate(batch_examples[i : i + micro], pad_id)
        p = prepare_dllm_batch(
            batch, cfg, step=step, token_offset=offset, attn_implementation=attn, dtype=param.dtype,
            device=param.device,
        )  # fmt: skip
        offset += batch["input_ids"].numel()
        prepared.append(p)
    return prepared


def train_dllm(
    model: nn.Module,
    examples: Sequence[Any],
    *,
    cfg: DLLMConfig | dict | None = None,
    tokenizer: Any = None,
    pad_id: int | None = None,
    steps: int = 10,
    batch_size: int = 4,
    micro_batch_size: int | None = None,
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    max_grad_norm: float | None = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    shuffle_seed: int = 0,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """dLLM SFT (no targets) or dLLM T3S (examples carry ``target_mask``) on a single process.

    Args:
        model: a Hugging Face causal LM on its device (attention ``sdpa`` / ``eager`` / ``flex_attention``).
        examples: ``t3s.data.TokenizedExample`` s: ``input_ids``, ``labels`` (−100 on the prompt), and for
            dLLM T3S ``target_mask`` (1 = always masked; the ``dllm_targets`` selection ``Δc < −tau`` from an AR
            selector sharing the tokenizer). Examples without ``target_mask`` train as plain dLLM SFT.
        cfg: :class:`DLLMConfig` or its dict (``cfg.dllm`` of the YAML config).
        tokenizer: gives ``mask_token_id`` (when ``cfg.mask_token_id`` is unset) and ``pad_token_id``.
        pad_id: pad id for collation (default: the tokenizer's, else ``cfg.mask_token_id``).
        steps, batch_size, micro_batch_size: optimizer steps, examples per step, examples per forward.
        lr, weight_decay, betas, max_grad_norm: AdamW (``optimizer`` replaces it).
        warmup_steps, schedule, min_lr_ratio: the learning-rate schedule over ``steps``, the same as AR
            training's (:func:`t3s.schedule.lr_lambda`: linear warm-up, then ``cosine`` to ``min_lr_ratio x lr``
            or ``constant``).
        log: called with each step's row.

    Returns:
        One row per step: ``step``, ``loss``, ``lr`` (the rate this step used), ``grad_norm``, ``normalizer``
        and per class (random / target / forced) ``n_*`` masked counts and ``ce_*`` mean CE.
    """
    cfg = resolve_dllm_config(cfg, tokenizer)
    if not examples:
        raise ValueError("train_dllm: empty dataset")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad_id = cfg.mask_token_id if pad_id is None else pad_id
    micro = micro_batch_size or batch_size
    lm = _adapter(model)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    sched = lr_scheduler(opt, total_steps=steps, warmup_steps=warmup_steps, schedule=schedule,
                         min_lr_ratio=min_lr_ratio)
    param = next(lm.model.parameters())
    attn = _attn_impl(lm.model)
    rng = random.Random(shuffle_seed)
    order: list[int] = []
    history = []
    lm.model.train()
    for step in range(steps):
        while len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        prepared = _prepare_step([examples[j] for j in idx], cfg, step=step, micro=micro, pad_id=pad_id, attn=attn,
                                 param=param)
        normalizer = step_normalizer(prepared, cfg.normalization)
        opt.zero_grad(set_to_none=True)
        total, stats = torch.zeros((), device=param.device), []
        for p in prepared:
            out = dllm_loss(lm, p, cfg, normalizer)
            out.loss.backward()
            total += out.loss.detach()
            stats.append(out.stats)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))  # inf: measure, clip nothing
        )
        lr_used = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        row = {
            "step": step,
            "loss": float(total),
            "lr": lr_used,
            "grad_norm": float(grad_norm),
            "normalizer": float(normalizer),
            **_summarise(stats),
        }
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"dllm step {step}: non-finite loss {row['loss']}")
        history.append(row)
        if log is not None:
            log(row)
    return history


# ----------------------------------------------------------------------------------------------------------
# Evaluation: block-diffusion decoding with the training layout


@torch.no_grad()
def diffusion_generate(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    block_size: int,
    mask_token_id: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], str]:
    """Decode one completion block by block, as the block-diffusion student was trained to denoise.

    Blocks are counted from the start of the sequence, as in training (the response may begin inside the
    prompt's last block). For the current block, the unknown positions start as ``[MASK]``; each forward runs
    the training input ``[x_t ‖ x_0]`` with the 2L block-diffusion mask (``x_t`` = prefix + the partly unmasked
    block, seeing itself within the block and the clean prefix in strictly earlier blocks) and fixes the one
    masked position whose prediction is most confident (greedy, or a sampled token with ``temperature > 0``)
    — low-confidence remasking with one token per step, so ``max_new_tokens`` forwards at most. Decoding stops
    after a block that contains an end token.

    Returns ``(token ids without the end token, finish reason)`` — ``stop`` or ``length``.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not prompt:
        raise ValueError("an empty prompt cannot be generated from")
    lm = _adapter(model)
    param = next(lm.model.parameters())
    dev, attn = param.device, _attn_impl(lm.model)
    stops = {int(e) for e in eos_token_ids}
    seq, new = [int(t) for t in prompt], []
    was = lm.model.training
    lm.model.eval()
    while len(new) < max_new_tokens:
        start = len(seq)
        n = min((start // block_size + 1) * block_size - start, max_new_tokens - len(new))
        cur = torch.tensor([*seq, *[mask_token_id] * n], dtype=torch.long, device=dev)[None]
        L = cur.shape[1]
        doc = torch.zeros(1, L, dtype=torch.int64, device=dev)
        mask = _build_attention_mask(attn, block_size, doc, param.dtype)
        pos = position_ids_from_document_ids(doc)
        todo = list(range(start, start + n))
        while todo:
            hidden = lm.hidden_states(input_ids=torch.cat([cur, cur], dim=1), attention_mask=mask,
                                      position_ids=torch.cat([pos, pos], dim=1))[:, :L]
            logits = lm.logits(hidden[0, todo]).float()  # [len(todo), V]
            logits[:, mask_token_id] = float("-inf")  # [MASK] is never an answer
            probs = torch.softmax(logits / temperature if temperature > 0 else logits, dim=-1)
            if temperature > 0:
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                tok = probs.argmax(-1)
            conf = probs.gather(-1, tok[:, None]).squeeze(-1)
            k = int(conf.argmax())
            cur[0, todo[k]] = tok[k]
            del todo[k]
        block = cur[0, start:].tolist()
        seq += block
        cut = next((j for j, t in enumerate(block) if t in stops), None)
        if cut is not None:
            new += block[:cut]
            lm.model.train(was)
            return new, "stop"
        new += block
    lm.model.train(was)
    return new, "length"


class DiffusionBackend(GenerationBackend):
    """A :class:`t3s.generate.GenerationBackend` over :func:`diffusion_generate` (one prompt at a time).

    Exact, not fast: no KV cache, one forward per generated token over the whole ``2L`` sequence.
    """

    name = "diffusion"

    def __init__(self, model: nn.Module, tokenizer, cfg: DLLMConfig, *, eos_token_ids: Sequence[int],
                 progress: bool = False, desc: str = "diffusion decode"):
        if cfg.mask_token_id is None:
            raise ValueError("diffusion decoding needs dllm.mask_token_id")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.eos, self.progress, self.desc = list(eos_token_ids), progress, desc

    def generate(self, prompts, sampling):
        from tqdm.auto import tqdm

        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=next(_adapter(self.model).model.parameters()).device)
            gen.manual_seed(int(sampling.seed))
        out = []
        for p in tqdm(prompts, desc=self.desc, disable=not self.progress, leave=False):
            comps = []
            for _ in range(sampling.num_samples):
                toks, reason = diffusion_generate(
                    self.model, p, block_size=self.cfg.block_size, mask_token_id=int(self.cfg.mask_token_id),
                    max_new_tokens=sampling.max_new_tokens, eos_token_ids=self.eos,
                    temperature=sampling.temperature, generator=gen,
                )  # fmt: skip
                comps.append(Completion(toks, self.tokenizer.decode(toks, skip_special_tokens=True), reason))
            out.append(comps)
        return out

    def close(self) -> None:
        pass
