"""Batched greedy generation and answer accuracy (training accuracy for the bottleneck; held-out evaluation).

A plain KV-cache loop over a Hugging Face causal LM with left padding: prompts are sorted by length and cut
into batches, each batch runs until every row has produced an end token or ``max_new_tokens`` tokens.
Under ``torchrun`` the prompts are sharded across ranks; every rank runs the same number of batches and
decoding steps (FSDP needs every rank in every forward), and the counts are all-reduced.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids as the model sees them before its answer (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """End-of-answer ids: the tokenizer's EOS plus the model's generation-config EOS (may be a list)."""
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    if not ids:
        raise ValueError("tokenizer and model define no eos_token_id; generation would never stop early")
    return sorted(ids)


def _forward(model, **kw):
    try:
        return model(**kw, logits_to_keep=1)
    except TypeError:  # older / custom models without logits_to_keep
        return model(**kw)


@torch.no_grad()
def generate_greedy(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_token_ids: Sequence[int], pad_token_id: int, batch_size: int = 32,
                    progress: bool = False, desc: str = "generate") -> list[list[int]]:
    """Greedy completions (token ids, end token excluded) for every prompt of *this rank*, in input order.

    When a process group is initialised, call it on every rank with each rank's own prompts; the number of
    batches and decoding steps is synchronised so sharded models never deadlock.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be generated from")
    device = _device_of(model)
    eos = torch.tensor(list(eos_token_ids), device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    _, world = _world()
    n_batches = len(batches)
    if world > 1:  # every rank must run the same number of forwards
        t = torch.tensor([n_batches], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_batches = int(t.item())
    was_training = model.training
    model.eval()
    out: list[list[int] | None] = [None] * len(prompts)
    for b in tqdm(range(n_batches), desc=desc, disable=not progress, leave=False):
        idx = batches[b] if b < len(batches) else batches[-1][:1] if batches else []
        dummy = b >= len(batches)
        rows = [list(prompts[i]) for i in idx] or [[pad_token_id]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row, device=device)
            mask[r, width - len(row):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new = torch.empty((len(rows), 0), dtype=torch.long, device=device)
        past = None
        step_ids, step_pos = ids, pos
        for _ in range(max_new_tokens):
            res = _forward(model, input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                           past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].float().argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            new = torch.cat([new, nxt[:, None]], dim=1)
            done = done | torch.isin(nxt, eos)
            all_done = done.all()
            if world > 1:
                flag = (~all_done).to(torch.int32).reshape(1)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                all_done = flag.item() == 0
            if bool(all_done):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt[:, None]
        if dummy:
            continue
        for r, i in enumerate(idx):
            toks = new[r].tolist()
            cut = len(toks)
            for j, t in enumerate(toks):
                if t in eos_token_ids:
                    cut = j
                    break
            out[i] = toks[:cut]
    model.train(was_training)
    return [o if o is not None else [] for o in out]


@dataclass
class AccuracyResult:
    accuracy: float
    correct: int
    total: int
    completions: list[str] = field(default_factory=list)
    """Decoded completions of this rank's prompts (all prompts on a single process)."""
    is_correct: list[bool] = field(default_factory=list)


def answer_accuracy(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                    golds: Sequence[str], *, verifier: Callable[[str, str], bool], max_new_tokens: int,
                    batch_size: int = 32, progress: bool = False, desc: str = "accuracy") -> AccuracyResult:
    """Greedy-decode every prompt and check the completion against its gold answer.

    Under ``torchrun`` pass the same full lists on every rank: they are sharded here and the counts
    all-reduced, so every rank returns the global accuracy.
    """
    if len(prompts) != len(golds):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} gold answers")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    rank, world = _world()
    mine = list(range(rank, len(prompts), world))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(model, tokenizer)[0]
    outs = generate_greedy(model, [prompts[i] for i in mine], max_new_tokens=max_new_tokens,
                           eos_token_ids=stop_token_ids(model, tokenizer), pad_token_id=pad,
                           batch_size=batch_size, progress=progress and rank == 0, desc=desc)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    ok = [bool(verifier(t, golds[i])) for t, i in zip(texts, mine, strict=True)]
    correct, total = sum(ok), len(ok)
    if world > 1:
        t = torch.tensor([correct, total], dtype=torch.long, device=_device_of(model))
        dist.all_reduce(t)
        correct, total = int(t[0]), int(t[1])
        gathered: list = [None] * world
        dist.all_gather_object(gathered, list(zip(mine, texts, ok, strict=True)))
        rows = sorted(r for g in gathered for r in g)
        texts, ok = [r[1] for r in rows], [r[2] for r in rows]
    return AccuracyResult(correct / max(total, 1), correct, total, texts, ok)


def subset_indices(n: int, k: int | None, seed: int = 0) -> list[int]:
    """A fixed, seeded subset of ``k`` of ``n`` indices (all when ``k`` is None or >= n), sorted."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))
