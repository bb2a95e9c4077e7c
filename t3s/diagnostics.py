"""The paper's diagnostics, as evaluation hooks for :class:`t3s.train.SFTRecipe` and one optional stage.

* :class:`GroupDynamics` — at every evaluation of a run: the mean Δ-probability ``p_t(θ_k) − p_t(θ0)`` of
  anchor tokens and of the other response tokens (paper Fig. 4), and optionally the norm ratio and cosine
  between the gradients of the two groups (Fig. 6). Both group losses are token sums divided by the number of
  response tokens, i.e. each group's share of the real SFT gradient.
* :class:`AnchorIntervention` — paper Fig. 5: at every evaluation of the SFT run, from a copy of the current
  weights, one update on the anchor tokens only and one on the other tokens only; the change of each group's
  mean loss (Fig. 5a is ``ΔL_other`` after the anchor-only step, Fig. 5b the anchor loss itself). The update is
  a first Adam step (``lr · g / (|g| + eps)``, i.e. about ``lr · sign(g)``), the size of a real early update,
  and the weights are restored afterwards. Accuracy is not re-measured (one more generation pass per group
  and checkpoint); the loss changes are the paper's quantity.
* :func:`loss_transfer_subsets` + :class:`SubsetLoss` — the 4×4 loss-transfer matrix (paper Table 6,
  Appendix L): anchors and others each split in halves by base confidence (Easy = higher), one run per
  subset trained on that subset only, and the % change of the mean loss of every subset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from t3s.data import IGNORE_INDEX, TokenizedExample, collate
from t3s.train import reshard_root

SUBSETS = ("anchor_easy", "anchor_hard", "other_easy", "other_hard")


def _batches(examples: Sequence[TokenizedExample], masks: Sequence[Sequence[bool]] | None, pad: int, size: int):
    for i in range(0, len(examples), size):
        batch = collate(list(examples[i : i + size]), pad)
        if masks is not None:
            m = torch.zeros_like(batch["labels"], dtype=torch.bool)
            for r, mask in enumerate(masks[i : i + size]):
                m[r, : len(mask)] = torch.tensor(list(mask), dtype=torch.bool)
            batch["group"] = m
        yield batch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _grad_vector_stats(params, grads_a, grads_o, sharded: bool) -> tuple[float, float]:
    """(‖g_a‖ / ‖g_o‖, cos(g_a, g_o)) over all parameters (local shards + all-reduce under FSDP2)."""
    dev = next(iter(params)).device if params else torch.device("cpu")
    acc = torch.zeros(3, dtype=torch.float64, device=dev)
    for ga, go in zip(grads_a, grads_o, strict=True):
        if ga is None or go is None:
            continue
        a, o = _local(ga).double().flatten(), _local(go).double().flatten()
        acc += torch.stack([a @ a, o @ o, a @ o]).to(acc.device)
    if sharded and dist.is_initialized():
        dist.all_reduce(acc)
    na, no, dot = acc[0].sqrt().item(), acc[1].sqrt().item(), acc[2].item()
    ratio = na / no if no > 0 else float("inf")
    cos = dot / (na * no) if na > 0 and no > 0 else 0.0
    return ratio, cos


class GroupDynamics:
    """Evaluation hook: anchor-vs-other Δ-probability (and gradient) statistics on a few training examples.

    Args:
        examples: probe examples (labels on response tokens).
        anchors: per example, a bool per position aligned with ``labels``: True for anchor tokens.
        grad_stats: also compute the gradient-norm ratio and cosine between the two groups.
        batch_size: examples per forward.
    """

    def __init__(self, examples: Sequence[TokenizedExample], anchors: Sequence[Sequence[bool]], *,
                 grad_stats: bool = False, batch_size: int = 8):
        if len(examples) != len(anchors):
            raise ValueError(f"{len(examples)} probe examples but {len(anchors)} anchor masks")
        self.examples, self.anchors = list(examples), [list(a) for a in anchors]
        self.grad_stats, self.batch_size = grad_stats, batch_size
        self.base_probs: list[torch.Tensor] | None = None

    @torch.no_grad()
    def _probs(self, recipe) -> list[torch.Tensor]:
        out = []
        was = recipe.policy.training
        recipe.policy.eval()
        for b in _batches(self.examples, None, recipe.tokenizer.pad_token_id, self.batch_size):
            lp = recipe.policy(mode="logprobs", input_ids=b["input_ids"].to(recipe.device),
                               labels=b["labels"].to(recipe.device),
                               attention_mask=b["attention_mask"].to(recipe.device)).logprob
            out.extend(lp.float().exp().cpu())
        recipe.policy.train(was)
        reshard_root(recipe.policy)
        return out

    def __call__(self, recipe, step: int) -> dict[str, float]:
        probs = self._probs(recipe)
        if self.base_probs is None:
            self.base_probs = probs  # the first evaluation (step 0) is θ0
        sums = {"anchor": [0.0, 0], "other": [0.0, 0]}
        for p, p0, ex, anc in zip(probs, self.base_probs, self.examples, self.anchors, strict=True):
            for t, label in enumerate(ex.labels):
                if label == IGNORE_INDEX:
                    continue
                g = sums["anchor" if anc[t] else "other"]
                g[0] += float(p[t] - p0[t])
                g[1] += 1
        metrics = {f"dprob_{k}": (v[0] / v[1] if v[1] else float("nan")) for k, v in sums.items()}
        if self.grad_stats:
            metrics.update(self._grad_metrics(recipe))
        return metrics

    def _grad_metrics(self, recipe) -> dict[str, float]:
        params = [p for p in recipe.policy.parameters() if p.requires_grad]
        grads = {}
        n_resp = sum(e.num_response_tokens for e in self.examples)
        for group in ("anchor", "other"):
            recipe.optimizer.zero_grad(set_to_none=True)
            masks = [[bool(a) if group == "anchor" else not a for a in anc] for anc in self.anchors]
            for b in _batches(self.examples, masks, recipe.tokenizer.pad_token_id, self.batch_size):
                w = (b.pop("group") & (b["labels"] != IGNORE_INDEX)).float()
                out = recipe.policy(mode="loss", input_ids=b["input_ids"].to(recipe.device),
                                    labels=b["labels"].to(recipe.device),
                                    attention_mask=b["attention_mask"].to(recipe.device),
                                    token_weight=w.to(recipe.device), normalizer=float(n_resp), reduction="mean")
                (out.loss * recipe.world).backward()
            grads[group] = [None if p.grad is None else p.grad.detach().clone() for p in params]
        recipe.optimizer.zero_grad(set_to_none=True)
        sharded = any(hasattr(g, "to_local") for g in grads["anchor"] if g is not None)
        ratio, cos = _grad_vector_stats(params, grads["anchor"], grads["other"], sharded)
        return {"grad_norm_ratio": ratio, "grad_cosine": cos}


class AnchorIntervention:
    """Evaluation hook for paper Fig. 5 (see the module docstring); restores the weights it changes.

    Args:
        examples: probe examples. anchors: per example, True on anchor positions (aligned with ``labels``).
        lr: size of the one-step update. eps: Adam's epsilon.
    """

    def __init__(self, examples: Sequence[TokenizedExample], anchors: Sequence[Sequence[bool]], *, lr: float,
                 eps: float = 1e-8, batch_size: int = 8):
        if len(examples) != len(anchors):
            raise ValueError(f"{len(examples)} probe examples but {len(anchors)} anchor masks")
        if not lr > 0:
            raise ValueError(f"intervention lr must be > 0, got {lr}")
        self.examples, self.anchors = list(examples), [list(a) for a in anchors]
        self.lr, self.eps, self.batch_size = lr, eps, batch_size

    def _masks(self, group: str) -> list[list[bool]]:
        return [[(bool(a) if group == "anchor" else not a) and label != IGNORE_INDEX
                 for a, label in zip(anc, ex.labels, strict=True)] for anc, ex in zip(self.anchors, self.examples,
                                                                                      strict=True)]

    @torch.no_grad()
    def _group_losses(self, recipe) -> dict[str, float]:
        return SubsetLoss(self.examples, {g: self._masks(g) for g in ("anchor", "other")}, self.batch_size)(recipe, 0)

    def _step_on(self, recipe, group: str, params) -> None:
        masks = self._masks(group)
        n = sum(sum(m) for m in masks)
        recipe.optimizer.zero_grad(set_to_none=True)
        for b in _batches(self.examples, masks, recipe.tokenizer.pad_token_id, self.batch_size):
            w = b.pop("group").float()
            out = recipe.policy(mode="loss", input_ids=b["input_ids"].to(recipe.device),
                                labels=b["labels"].to(recipe.device),
                                attention_mask=b["attention_mask"].to(recipe.device),
                                token_weight=w.to(recipe.device), normalizer=float(max(n, 1)), reduction="mean")
            (out.loss * recipe.world).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad / (p.grad.abs() + self.eps), alpha=-self.lr)
        recipe.optimizer.zero_grad(set_to_none=True)

    def __call__(self, recipe, step: int) -> dict[str, float]:
        params = [p for p in recipe.policy.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        before = self._group_losses(recipe)
        metrics = {"loss_anchor": before["loss_anchor"], "loss_other": before["loss_other"]}
        was = recipe.policy.training
        for group in ("anchor", "other"):
            recipe.policy.train()
            self._step_on(recipe, group, params)
            after = self._group_losses(recipe)
            for g in ("anchor", "other"):
                metrics[f"intervention_{group}_step_dloss_{g}"] = after[f"loss_{g}"] - before[f"loss_{g}"]
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
        recipe.policy.train(was)
        return metrics


def loss_transfer_subsets(examples: Sequence[TokenizedExample], anchors: Sequence[Sequence[bool]],
                          base_logprobs: Sequence[Sequence[float]]) -> dict[str, list[list[bool]]]:
    """Per-example masks of the four subsets: anchors / others split at their median base confidence."""
    out = {s: [[False] * len(e.labels) for e in examples] for s in SUBSETS}
    for group, is_anchor in (("anchor", True), ("other", False)):
        cells = [(float(base_logprobs[i][t]), i, t) for i, e in enumerate(examples)
                 for t, label in enumerate(e.labels) if label != IGNORE_INDEX and bool(anchors[i][t]) == is_anchor]
        cells.sort(key=lambda c: (-c[0], c[1], c[2]))  # most confident first
        half = len(cells) // 2
        for k, (_, i, t) in enumerate(cells):
            out[f"{group}_{'easy' if k < half else 'hard'}"][i][t] = True
    return out


class SubsetLoss:
    """Evaluation hook: mean token loss of each subset (masks aligned with ``labels``)."""

    def __init__(self, examples: Sequence[TokenizedExample], subsets: dict[str, list[list[bool]]],
                 batch_size: int = 8):
        self.examples, self.subsets, self.batch_size = list(examples), subsets, batch_size

    @torch.no_grad()
    def __call__(self, recipe, step: int) -> dict[str, float]:
        sums = {s: [0.0, 0] for s in self.subsets}
        i0 = 0
        was = recipe.policy.training
        recipe.policy.eval()
        for b in _batches(self.examples, None, recipe.tokenizer.pad_token_id, self.batch_size):
            lp = recipe.policy(mode="logprobs", input_ids=b["input_ids"].to(recipe.device),
                               labels=b["labels"].to(recipe.device),
                               attention_mask=b["attention_mask"].to(recipe.device)).logprob.float().cpu()
            for r in range(lp.shape[0]):
                for s, masks in self.subsets.items():
                    m = torch.tensor(masks[i0 + r], dtype=torch.bool)
                    sums[s][0] += float(-lp[r, : len(m)][m].sum())
                    sums[s][1] += int(m.sum())
            i0 += lp.shape[0]
        recipe.policy.train(was)
        reshard_root(recipe.policy)
        return {f"loss_{s}": (v[0] / v[1] if v[1] else float("nan")) for s, v in sums.items()}


def transfer_matrix(before: dict[str, float], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``100 · (ℓ_T(θ_S) − ℓ_T(θ0)) / ℓ_T(θ0)`` for every trained subset S (rows) and evaluated subset T."""
    return {s: {t: 100.0 * (after[s][f"loss_{t}"] - before[f"loss_{t}"]) / before[f"loss_{t}"]
                for t in SUBSETS} for s in after}
