"""``report``: report.md, results.json and the figures from every earlier output → ``report/``."""

from __future__ import annotations

from t3s import distributed as D
from t3s.pipeline_stages.context import RunContext, StageBody
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody, earlier: list[Stage]) -> Stage:
    # reads every earlier output and the whole config; rebuilding it is cheap
    inputs = {f"{st.name}:{out}": ctx.run_dir / out for st in earlier for out in st.outputs}
    return Stage("report", run, config=("",), inputs=inputs, outputs=("report",))


def run(ctx: RunContext) -> dict:
    from t3s.report import build_report

    if D.is_main():
        path = build_report(ctx.run_dir, ctx.cfg, description=ctx.description)
        ctx.log(f"[t3s] report: {path}")
    return {}
