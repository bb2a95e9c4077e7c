"""``train_<variant>``: train one variant from θ0 on its selection → ``variants/<variant>/``.

AR mode here (with the optional accuracy tracking and token-group diagnostics); dLLM mode in
:mod:`t3s.pipeline_stages.train_dllm`.
"""

from __future__ import annotations

from t3s.pipeline_stages import train_dllm
from t3s.pipeline_stages.accuracy import accuracy_hook
from t3s.pipeline_stages.context import SELECTION_VARIANTS, TRAINING_KEYS, RunContext, StageBody
from t3s.pipeline_stages.probes import anchors, probe
from t3s.pipeline_stages.select import variant_examples
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody, variant: str) -> Stage:
    c, r = ctx.cfg, ctx.run_dir
    with_dynamics = c.diagnostics.delta_prob and variant in ("sft", "t3s") and not ctx.dllm
    inputs = ctx.model_inputs(ar=False)
    if ctx.dllm and variant == "t3s":
        inputs["selections/dllm_targets"] = r / "selections" / "dllm_targets"
    elif variant in SELECTION_VARIANTS:
        inputs[f"selections/{variant}"] = r / "selections" / variant
    if with_dynamics:
        inputs["selections/t3s"] = r / "selections" / "t3s"
    acc = ("accuracy", "-accuracy.curve") if c.accuracy.track_variants else ("accuracy.track_variants",)
    diag = ("diagnostics.delta_prob", "diagnostics.grad_stats", "diagnostics.num_examples") \
        if with_dynamics else ("diagnostics.delta_prob",)
    if variant == "sft":
        diag = (*diag, "diagnostics.anchor_intervention", "diagnostics.intervention_lr")
    return Stage(f"train_{variant}", run, config=(*TRAINING_KEYS, *acc, *diag, *(("dllm",) if ctx.dllm else ())),
                 inputs=inputs, outputs=(f"variants/{variant}",))


def run(ctx: RunContext, variant: str) -> dict:
    from t3s.diagnostics import AnchorIntervention, GroupDynamics
    from t3s.train import run_training

    if ctx.dllm:
        return train_dllm.run(ctx, variant)
    hooks = []
    if ctx.cfg.accuracy.track_variants:
        hooks.append(accuracy_hook(ctx, use_curve=False))
    dg = ctx.cfg.diagnostics
    if dg.delta_prob and variant in ("sft", "t3s"):
        examples = probe(ctx)
        hooks.append(GroupDynamics(examples, anchors(ctx, examples), grad_stats=dg.grad_stats and variant == "sft"))
    if dg.anchor_intervention and variant == "sft":
        examples = probe(ctx)
        hooks.append(AnchorIntervention(examples, anchors(ctx, examples), lr=dg.intervention_lr or ctx.cfg.optim.lr))
    out = ctx.run_dir / "variants" / variant
    res = run_training(ctx.cfg, variant_examples(ctx, variant), out, evaluate=hooks, save_final=True,
                       name=variant, progress=ctx.progress)
    return {"steps_run": res.steps_run}
