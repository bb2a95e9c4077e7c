"""``rrt``: the reset-and-retrain checkpoint from θ0, θb and θf → ``variants/rrt/final``."""

from __future__ import annotations

from pathlib import Path

from t3s import distributed as D
from t3s.io import read_json
from t3s.pipeline_stages.context import RunContext, StageBody
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody) -> Stage:
    # θf: the trajectory's own final checkpoint, or the SFT variant's (final_source)
    r = ctx.run_dir
    return Stage("rrt", run, config=(),
                 inputs={"model.path": ctx.cfg.model.path, "tokenizer": ctx.tokenizer_dir,
                         "trajectory/bottleneck": r / "trajectory" / "bottleneck",
                         "trajectory/final": r / "trajectory" / "final",
                         "variants/sft/final": r / "variants" / "sft" / "final"},
                 outputs=("variants/rrt",))


def final_source(ctx: RunContext) -> Path:
    """θf for RRT: the trajectory's own final checkpoint when it ran to the end, else the SFT variant's."""
    summary = read_json(ctx.run_dir / "trajectory" / "summary.json")
    own = ctx.run_dir / "trajectory" / "final"
    if not summary.get("stopped_early") and (own / "config.json").exists():
        return own
    sft = ctx.run_dir / "variants" / "sft" / "final"
    if not (sft / "config.json").exists():
        raise RuntimeError("RRT needs θf: the trajectory stopped early and no SFT variant was trained")
    return sft


def run(ctx: RunContext) -> dict:
    from t3s.rrt import rrt_checkpoint

    final = final_source(ctx)
    if D.is_main():
        rrt_checkpoint(ctx.cfg.model.path, ctx.run_dir / "trajectory" / "bottleneck", final,
                       ctx.run_dir / "variants" / "rrt" / "final", tokenizer_dir=ctx.tokenizer_dir,
                       trust_remote_code=ctx.cfg.model.trust_remote_code)
    return {"theta_f": str(final)}
