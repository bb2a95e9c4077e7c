"""``train_<variant>`` in dLLM mode: block-diffusion SFT (random masks) or dLLM T3S (union mask with the
Δc < −τ targets) → ``variants/<variant>/`` (metrics.jsonl, summary.json, final/)."""

from __future__ import annotations

import json

from t3s.io import write_json_atomic
from t3s.pipeline_stages.context import RunContext
from t3s.pipeline_stages.select import variant_examples


def run(ctx: RunContext, variant: str) -> dict:
    from dataclasses import asdict

    from t3s.dllm import resolve_dllm_config
    from t3s.train import run_dllm_training

    out = ctx.run_dir / "variants" / variant
    final = run_dllm_training(ctx.cfg, variant_examples(ctx, variant), out)
    resolved = asdict(resolve_dllm_config(ctx.cfg.dllm, ctx.tokenizer))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    write_json_atomic(out / "summary.json", {
        "mode": "dllm", "variant": variant, "steps_run": len(rows), "final_dir": str(final), "dllm": resolved,
        "targets": variant == "t3s", "trust_remote_code": ctx.cfg.model.trust_remote_code,
        "selector": ctx.cfg.model.selector})
    return {"steps_run": len(rows)}
