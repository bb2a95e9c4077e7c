"""``bottleneck``: θb from the training-accuracy curve (checked first: a flat or truncated curve is an error,
never a silent θb). Reads ``trajectory/``; writes ``bottleneck.json`` (and, with vLLM accuracy,
``trajectory/bottleneck`` copied out of the saved checkpoints).
"""

from __future__ import annotations

import shutil

from t3s import distributed as D
from t3s.io import atomic_path, read_json, write_json_atomic
from t3s.pipeline_stages.accuracy import BUILTIN_VERIFIERS, curve_problem
from t3s.pipeline_stages.context import RunContext, StageBody
from t3s.pipeline_stages.trajectory_eval import trajectory_checkpoints
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody) -> Stage:
    r = ctx.run_dir
    outputs = ("bottleneck.json", "trajectory/bottleneck") if ctx.offline_accuracy else ("bottleneck.json",)
    return Stage("bottleneck", run, config=("bottleneck", "accuracy.max_truncated_fraction"),
                 inputs={"trajectory/summary.json": r / "trajectory" / "summary.json",
                         "trajectory/bottleneck": r / "trajectory" / "bottleneck",
                         "trajectory/metrics.jsonl": r / "trajectory" / "metrics.jsonl"},
                 outputs=outputs)


def run(ctx: RunContext) -> dict:
    from t3s.bottleneck import check_curve, describe, find_bottleneck
    from t3s.report import read_metrics

    cfg, traj = ctx.ar_cfg, ctx.run_dir / "trajectory"
    summary = read_json(traj / "summary.json")
    settings = read_json(traj / "evaluation.json") if (traj / "evaluation.json").exists() else {}
    rows = [r for r in read_metrics(traj / "metrics.jsonl") if "train_accuracy" in r]
    b, problem = cfg.bottleneck, None
    if b.method != "fixed":
        a = cfg.accuracy
        if a.verifier not in BUILTIN_VERIFIERS:
            rows = [{k: v for k, v in r.items() if k != "train_no_answer_fraction"} for r in rows]
        mnt = settings.get("max_new_tokens", {})
        problem = curve_problem(ctx, lambda: check_curve(
            rows, max_truncated_fraction=a.max_truncated_fraction,
            max_new_tokens=mnt.get("max_new_tokens"), longest_response=mnt.get("longest_response")))
    if ctx.offline_accuracy:
        curve = {int(r["step"]): float(r["train_accuracy"]) for r in rows}
        bn = find_bottleneck(curve, method=b.method, step=b.step, patience=b.patience, min_delta=b.min_delta,
                             min_step=b.min_step).to_dict()
        if b.method != "fixed" and D.is_main():
            src = trajectory_checkpoints(ctx).get(bn["step"])
            if src is None:
                raise RuntimeError(f"no saved trajectory checkpoint for the bottleneck step {bn['step']}")
            with atomic_path(traj / "bottleneck", is_dir=True) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
    else:
        bn = summary["bottleneck"]
    bn["min_step"] = b.min_step
    shock = shock_check(ctx, rows, settings) if b.method != "fixed" else None
    if not (traj / "bottleneck" / "config.json").exists():
        raise RuntimeError("the SFT trajectory left no bottleneck checkpoint in trajectory/bottleneck")
    info = {**bn, "description": describe(bn), "trajectory_steps": summary["steps_run"],
            "stopped_early": summary["stopped_early"], "evaluated_steps": [int(r["step"]) for r in rows],
            "curve_problem": problem, "shock": shock,
            "generation": {k: settings.get(k) for k in ("backend", "sampling", "max_new_tokens", "num_prompts")}}
    if D.is_main():
        write_json_atomic(ctx.run_dir / "bottleneck.json", info)
        if ctx.offline_accuracy and not ctx.cfg.train.keep_checkpoints:
            shutil.rmtree(traj / "checkpoints", ignore_errors=True)  # θb and θf are kept
    acc = bn["accuracy"]
    ctx.log(f"[t3s] Imitation Bottleneck at step {bn['step']} (training accuracy "
            f"{'n/a' if acc is None else format(acc, '.3f')}; {describe(bn)})")
    return {"step": bn["step"]}


def shock_check(ctx: RunContext, rows: list[dict], settings: dict) -> dict | None:
    """:func:`t3s.bottleneck.shock_check` on the trajectory; no shock stops here unless on_no_shock=proceed."""
    from t3s.bottleneck import NoShockError
    from t3s.bottleneck import shock_check as check

    sampling = settings.get("sampling") or {}
    trials = (settings["num_prompts"] * sampling.get("num_samples", 1)) if settings.get("num_prompts") else None
    shock = check({int(r["step"]): float(r["train_accuracy"]) for r in rows}, num_trials=trials)
    if shock is None or shock["message"] is None:
        return shock
    if not shock["shock"] and ctx.cfg.bottleneck.on_no_shock == "error":
        raise NoShockError(f"{shock['message']}. Stopped before profiling; bottleneck.on_no_shock=proceed runs "
                           "anyway")
    ctx.log(f"[t3s] WARNING: {shock['message']}")
    return shock
