"""``select``: per-token 0/1 weights for every selection rule (``dllm_targets`` in dLLM mode) → ``selections/``."""

from __future__ import annotations

from t3s import distributed as D
from t3s.pipeline_stages.context import RunContext, StageBody
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody) -> Stage:
    return Stage("select", run, config=("select", "variants"), inputs={"delta": ctx.run_dir / "delta"},
                 outputs=tuple(f"selections/{rule}" for rule in ctx.selection_rules()))


def run(ctx: RunContext) -> dict:
    from t3s.select import format_stats, save_selection, select_tokens

    rules = ctx.selection_rules()
    s = ctx.cfg.select
    if D.is_main():
        for rule in rules:
            sel = select_tokens(ctx.run_dir / "delta", rule=rule, threshold=s.threshold, quantile=s.quantile,
                                tau=s.tau, seed=s.seed, end_token_ids=s.end_token_ids, ranking=s.ranking,
                                always_train_eos=s.always_train_eos and rule != "dllm_targets")
            save_selection(sel, ctx.run_dir / "selections" / rule)
            ctx.log(f"[t3s]   {format_stats(sel)}")
    return {"rules": rules}


def variant_examples(ctx: RunContext, variant: str):
    """The training examples of one variant: every token for ``sft``, else weighted by its selection."""
    from t3s.select import apply_selection, load_selection

    if variant == "sft":
        return ctx.examples
    rule = "dllm_targets" if ctx.dllm else variant
    return apply_selection(ctx.examples, load_selection(ctx.run_dir / "selections" / rule))
