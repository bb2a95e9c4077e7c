"""``profile_base`` / ``profile_bottleneck``: per-token confidence c_t at θ0 and at θb → ``profile/<which>``."""

from __future__ import annotations

from t3s import distributed as D
from t3s.pipeline_stages.context import RunContext, StageBody
from t3s.stages import Stage

WHICH = ("base", "bottleneck")


def stage(ctx: RunContext, run: StageBody, which: str) -> Stage:
    if which == "base":
        inputs = ctx.model_inputs(ar=True)
    else:
        inputs = {"tokenizer": ctx.tokenizer_dir, "data.train": ctx.cfg.data.train,
                  "trajectory/bottleneck": ctx.run_dir / "trajectory" / "bottleneck"}
    return Stage(f"profile_{which}", run, config=("model.dtype", "data"), inputs=inputs,
                 outputs=(f"profile/{which}",))


def run(ctx: RunContext, which: str) -> dict:
    from t3s.profile import profile_confidence

    model = ctx.ar_cfg.model.path if which == "base" else str(ctx.run_dir / "trajectory" / "bottleneck")
    if ctx.cfg.model.trust_remote_code:  # profile's own loader never runs remote code: load it here
        from t3s.train import load_model

        model = load_model(model, dtype=ctx.cfg.model.dtype, device=D.device(), trust_remote_code=True)
    profile_confidence(model, ctx.tokenizer, ctx.examples, ctx.run_dir / "profile" / which,
                       max_tokens=ctx.cfg.data.max_length, dtype=ctx.cfg.model.dtype,
                       progress=ctx.progress, packing=ctx.cfg.train.packing,
                       attn_implementation=ctx.cfg.model.attn_implementation)
    return {}
