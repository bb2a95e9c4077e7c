"""``trajectory_eval`` (``generation.backend=vllm``): training accuracy of every saved trajectory checkpoint.

One vLLM engine per checkpoint, resumable per step. Reads ``trajectory/summary.json`` and the checkpoints;
writes ``trajectory/accuracy/step_*.json`` and appends the rows to ``trajectory/metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from t3s import distributed as D
from t3s.generate import SamplingConfig
from t3s.io import read_json, write_json_atomic
from t3s.pipeline_stages.accuracy import accuracy_subset, curve_check
from t3s.pipeline_stages.context import RunContext, StageBody
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody) -> Stage:
    return Stage("trajectory_eval", run, config=("accuracy", "generation"),
                 inputs={"trajectory/summary.json": ctx.run_dir / "trajectory" / "summary.json"},
                 outputs=("trajectory/accuracy",))


def trajectory_checkpoints(ctx: RunContext) -> dict[int, Path]:
    ck = ctx.run_dir / "trajectory" / "checkpoints"
    found = {int(p.name.split("_")[1]): p for p in ck.glob("step_*") if (p / "config.json").exists()}
    return dict(sorted(found.items()))


def run(ctx: RunContext) -> dict:
    from t3s.generate import VLLMBackend, answer_accuracy

    if D.is_distributed():
        raise RuntimeError("trajectory_eval starts vLLM engines (tensor-parallel over generation."
                           "tensor_parallel_size GPUs) and must run in a single process: re-run `t3s run CONFIG` "
                           "without torchrun; finished stages are skipped")
    settings = read_json(ctx.run_dir / "trajectory" / "evaluation.json")
    sampling = SamplingConfig(**settings["sampling"])
    idx = accuracy_subset(ctx)
    prompts = [ctx.examples[i].input_ids[: ctx.examples[i].response_start] for i in idx]
    golds = [ctx.records[i].answer for i in idx]
    g, check = ctx.cfg.generation, curve_check(ctx, settings)
    done_dir = ctx.run_dir / "trajectory" / "accuracy"
    checkpoints = {0: Path(ctx.ar_cfg.model.path), **trajectory_checkpoints(ctx)}
    rows = []
    for step, path in checkpoints.items():
        out = done_dir / f"step_{step:06d}.json"
        if not out.exists():
            with VLLMBackend(str(path), tokenizer=ctx.tokenizer_dir,
                             tensor_parallel_size=g.tensor_parallel_size, dtype=g.dtype,
                             trust_remote_code=ctx.cfg.model.trust_remote_code,
                             gpu_memory_utilization=g.gpu_memory_utilization, max_model_len=g.max_model_len,
                             engine_kwargs=g.engine_kwargs) as backend:
                res = answer_accuracy(backend, ctx.tokenizer, prompts, golds, verifier=ctx.verifier(),
                                      sampling=sampling)
            write_json_atomic(out, {"step": step, **res.metrics("train")})
        row = read_json(out)
        check(step, {k: v for k, v in row.items() if k != "step"})
        rows.append(row)
        ctx.log(f"[t3s]   step {step}: training accuracy {row['train_accuracy']:.3f}")
    with (ctx.run_dir / "trajectory" / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"checkpoints": len(rows)}
