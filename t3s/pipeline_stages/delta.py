"""``delta``: Δc_t = c_t(θb) − c_t(θ0) from the two profiles → ``delta/``."""

from __future__ import annotations

from t3s import distributed as D
from t3s.pipeline_stages.context import RunContext, StageBody
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody) -> Stage:
    return Stage("delta", run, config=(),
                 inputs={f"profile/{w}": ctx.run_dir / "profile" / w for w in ("base", "bottleneck")},
                 outputs=("delta",))


def run(ctx: RunContext) -> dict:
    from t3s.profile import delta_confidence

    info = {}
    if D.is_main():
        store = delta_confidence(ctx.run_dir / "profile" / "base", ctx.run_dir / "profile" / "bottleneck",
                                 out=ctx.run_dir / "delta")
        info = {"anchor_fraction": store.provenance["anchor_fraction"]}
        ctx.log(f"[t3s] Δc: {100 * info['anchor_fraction']:.1f}% of response tokens are anchors (Δc > 0)")
    return info
