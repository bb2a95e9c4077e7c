"""The diagnostics' probe examples and their anchor flags (from the T3S selection)."""

from __future__ import annotations

from t3s.data import IGNORE_INDEX, TokenizedExample
from t3s.generate import subset_indices
from t3s.pipeline_stages.context import RunContext


def anchors(ctx: RunContext, examples: list[TokenizedExample]) -> list[list[bool]]:
    """Anchor flags aligned with labels, from the T3S selection (weight 0 on a scored token = anchor)."""
    from t3s.select import apply_selection, load_selection

    sel = apply_selection(examples, load_selection(ctx.run_dir / "selections" / "t3s"))
    return [[label != IGNORE_INDEX and w == 0.0 for label, w in zip(e.labels, e.token_weight, strict=True)]
            for e in sel]


def probe_indices(ctx: RunContext) -> list[int]:
    return subset_indices(len(ctx.examples), ctx.cfg.diagnostics.num_examples, seed=ctx.cfg.train.seed + 1)


def probe(ctx: RunContext) -> list[TokenizedExample]:
    return [ctx.examples[i] for i in probe_indices(ctx)]
