"""Pretrain the demo's base student θ0 on teacher A's style (the demo's set-up, not the method).

A plain, fast loop: Hugging Face forward with ``labels`` (the vocabulary is a few hundred words, so the logits
are tiny), AdamW, linear warm-up then cosine decay. The stream is teacher-A traces on training-side problems,
half of them with filler words inserted (so the arithmetic is not tied to one context), plus a share of
batches of "word salad" made of teacher B's words (so B's tokens have trained embeddings, as a real student
would know them). Deterministic given the seed on a given machine and thread count.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from t3s.demo.task import TaskSpec, pretrain_stream, word_salad


@dataclass(frozen=True)
class PretrainSpec:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    salad_prob: float = 0.25  # probability that a batch is word salad
    filler_prob: float = 0.5  # probability that a teacher-A trace gets filler words
    preamble_prob: float = 0.0  # probability that a teacher-A trace opens with a sentence (teacher B's among others)
    salad_phrases: bool = False  # the word salad also holds teacher B's whole phrases
    short_prob: float = 0.0  # probability that a pretraining problem has two operands (one step), not three
    new_prob: float = 0.0  # probability that a pretraining problem is from the new family (θ0 solves part of it)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, spec: PretrainSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    chat = [{"role": "user", "content": prompt}]
    out = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _pad(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        att[i, : len(s)] = 1
    return ids, lab, att


def sft_batch(tokenizer, pairs: Sequence[tuple[str, str]]):
    """(input_ids, labels, attention_mask) with labels on response tokens and the end token only."""
    seqs, labels = [], []
    for prompt, response in pairs:
        p = chat_prompt_ids(tokenizer, prompt)
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    return _pad(seqs, labels, tokenizer.pad_token_id)


def salad_batch(tokenizer, texts: Sequence[str]):
    seqs = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    labels = [[-100] + s[1:] for s in seqs]
    return _pad(seqs, labels, tokenizer.pad_token_id)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 256):
    """Greedy completions (decoded, special tokens dropped) with a KV cache; prompts grouped by length."""
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    enc = [chat_prompt_ids(tokenizer, p) for p in prompts]
    outs: list[str | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        by_len.setdefault(len(e), []).append(i)
    for _, idx_all in sorted(by_len.items()):
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s : s + batch_size]
            x = torch.tensor([enc[i] for i in idx])
            out = model(input_ids=x, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            done = torch.zeros(len(idx), dtype=torch.bool)
            gen = []
            for _ in range(max_new_tokens):
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                gen.append(nxt)
                done |= nxt == eos
                if bool(done.all()):
                    break
                out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1)
            g = torch.stack(gen, 1).tolist()
            for j, i in enumerate(idx):
                toks = g[j]
                if eos in toks:
                    toks = toks[: toks.index(eos)]
                outs[i] = tokenizer.decode(toks, skip_special_tokens=True)
    model.train(was_training)
    return outs


def answer_accuracy(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 64) -> tuple[float, list[str]]:
    """Greedy held-out / training accuracy, checked the way the pipeline checks it (``t3s.answers``)."""
    from t3s.answers import check_completion

    gens = greedy_generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens)
    ok = [check_completion(g, str(r["answer"])) for g, r in zip(gens, records)]
    return sum(ok) / max(1, len(ok)), gens


def pretrain(
    model,
    tokenizer,
    task: TaskSpec,
    spec: PretrainSpec,
    *,
    eval_records: Sequence[dict] = (),
    eval_every: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``model`` in place; returns a summary (final loss, held-out accuracy, seconds)."""
    torch.manual_seed(spec.seed)
    rng = random.Random(f"t3s-demo-salad-{spec.seed}")
    stream = pretrain_stream(spec.seed, task, filler_prob=spec.filler_prob,
                             preamble_prob=spec.preamble_prob, short_prob=spec.short_prob,
                             new_prob=spec.new_prob)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    t0 = time.time()
    history = []
    ema = None
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        if rng.random() < spec.salad_prob:
            ids, lab, att = salad_batch(tokenizer, [word_salad(rng, task, phrases=spec.salad_phrases)
                                                     for _ in range(spec.batch_size)])
        else:
            ids, lab, att = sft_batch(tokenizer, [next(stream) for _ in range(spec.batch_size)])
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if eval_every and eval_records and ((step + 1) % eval_every == 0 or step + 1 == spec.steps):
            acc, _ = answer_accuracy(model, tokenizer, eval_records)
            history.append({"step": step + 1, "loss_ema": ema, "heldout_acc": acc, "seconds": time.time() - t0})
            if log:
                log(f"pretrain step {step + 1}/{spec.steps} loss {ema:.3f} held-out acc {acc:.3f} "
                    f"({time.time() - t0:.0f}s)")
        elif log and (step + 1) % 250 == 0:
            log(f"pretrain step {step + 1}/{spec.steps} loss {ema:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    summary = {"steps": spec.steps, "final_loss_ema": ema, "seconds": time.time() - t0, "history": history}
    if eval_records:
        summary["heldout_acc"], _ = answer_accuracy(model, tokenizer, eval_records)
    return summary
