"""``sft_trajectory``: baseline SFT from θ0 (the AR selector in dLLM mode) with training accuracy.

Reads the model, tokenizer and traces; writes ``trajectory/`` (metrics.jsonl, evaluation.json, summary.json,
bottleneck/ = θb, final/ = θf).
"""

from __future__ import annotations

import copy
from pathlib import Path

from t3s import distributed as D
from t3s.io import write_json_atomic
from t3s.pipeline_stages.accuracy import accuracy_hook, accuracy_settings
from t3s.pipeline_stages.context import TRAINING_KEYS, RunContext, StageBody
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody) -> Stage:
    if ctx.offline_accuracy:
        # trajectory_eval appends to metrics.jsonl and bottleneck copies θb out of checkpoints/ afterwards:
        # the trajectory's own record covers only what no later stage touches
        outputs = ("trajectory/summary.json", "trajectory/evaluation.json", "trajectory/final")
    else:
        outputs = ("trajectory",)
    return Stage("sft_trajectory", run,
                 config=(*TRAINING_KEYS, "accuracy", "bottleneck", "generation", "-accuracy.track_variants",
                         "-bottleneck.on_no_shock"),
                 inputs={**ctx.model_inputs(ar=True), "accuracy.curve": ctx.cfg.accuracy.curve}, outputs=outputs)


def run(ctx: RunContext) -> dict:
    from t3s.config import trajectory_stops_early
    from t3s.train import run_training

    cfg, out = ctx.ar_cfg, ctx.run_dir / "trajectory"
    if ctx.dllm:
        check_selector(ctx)
    settings = accuracy_settings(ctx)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "evaluation.json", settings)
    ctx.log(f"[t3s] training accuracy: {settings['num_prompts']} prompts, max_new_tokens "
            f"{settings['max_new_tokens']['max_new_tokens']} ({settings['max_new_tokens']['derived_from']}), "
            f"{'greedy' if settings['sampling']['temperature'] == 0 else 'sampled'}, backend "
            f"{settings['backend']}")
    if ctx.offline_accuracy:  # save every evaluated checkpoint; trajectory_eval measures them
        tcfg = copy.deepcopy(cfg)
        tcfg.train.keep_checkpoints = True
        res = run_training(tcfg, ctx.examples, out, evaluate=[], track_bottleneck=cfg.bottleneck.method == "fixed",
                           save_final=True, name="sft trajectory", progress=ctx.progress)
    else:
        res = run_training(cfg, ctx.examples, out, evaluate=[accuracy_hook(ctx, use_curve=True)],
                           track_bottleneck=True, save_final=not trajectory_stops_early(cfg),
                           name="sft trajectory", progress=ctx.progress)
    return {"steps_run": res.steps_run, "stopped_early": res.stopped_early}


def check_selector(ctx: RunContext) -> None:
    """dLLM mode: the AR selector must share the student's tokenizer (its ids index the same vocabulary)."""
    from transformers import AutoConfig

    sel = ctx.cfg.model.selector
    tok = ctx.tokenizer
    if Path(sel, "tokenizer_config.json").exists():
        from t3s.train import load_tokenizer

        other = load_tokenizer(sel, trust_remote_code=ctx.cfg.model.trust_remote_code)
        if other.get_vocab() != tok.get_vocab():
            raise ValueError(f"model.selector {sel} has a different tokenizer from the dLLM student; the paper's "
                             "selector shares the tokenizer (Δc positions must index the same tokens)")
    vocab = getattr(AutoConfig.from_pretrained(sel, local_files_only=True,
                                               trust_remote_code=ctx.cfg.model.trust_remote_code),
                    "vocab_size", None)
    if vocab is not None and vocab < len(tok):
        raise ValueError(f"model.selector {sel} has vocab_size {vocab} < the tokenizer's {len(tok)} tokens")
