"""Training accuracy: which prompts, with which generation settings, and the checks on the curve it gives."""

from __future__ import annotations

from collections.abc import Callable

from t3s.generate import SamplingConfig, derive_max_new_tokens, subset_indices
from t3s.io import read_json
from t3s.pipeline_stages.context import RunContext

BUILTIN_VERIFIERS = ("auto", "exact", "numeric", "math_verify")
"""Verifiers whose "no answer" share is meaningful (a custom verifier may read another format)."""


def accuracy_subset(ctx: RunContext) -> list[int]:
    return subset_indices(len(ctx.examples), ctx.cfg.accuracy.num_prompts, seed=ctx.cfg.train.seed)


def sampling(ctx: RunContext, which: str, prompt_lengths: list[int], model_path: str) -> tuple[SamplingConfig, dict]:
    """The sampling settings of ``accuracy`` or ``eval``, with ``max_new_tokens`` derived when unset."""
    sec = getattr(ctx.cfg, which)
    if sec.max_new_tokens is None:
        info = derive_max_new_tokens([e.num_response_tokens for e in ctx.examples], prompt_lengths,
                                     ctx.context_length(model_path))
    else:
        info = {"max_new_tokens": sec.max_new_tokens, "derived_from": f"{which}.max_new_tokens (set)",
                "longest_response": max(e.num_response_tokens for e in ctx.examples)}
    config = SamplingConfig(max_new_tokens=int(info["max_new_tokens"]), temperature=sec.temperature,
                            top_p=sec.top_p, num_samples=sec.num_samples, seed=sec.sampling_seed)
    return config, info


def accuracy_settings(ctx: RunContext) -> dict:
    """What the training-accuracy curve is measured with (written to ``trajectory/evaluation.json``)."""
    idx = accuracy_subset(ctx)
    config, info = sampling(ctx, "accuracy", [ctx.examples[i].response_start for i in idx], ctx.ar_cfg.model.path)
    g = ctx.cfg.generation
    return {"backend": g.backend, "in_training_loop": g.backend == "hf", "sampling": config.to_dict(),
            "max_new_tokens": info, "num_prompts": len(idx), "prompt_ids": [ctx.examples[i].id for i in idx],
            "verifier": ctx.cfg.accuracy.verifier, "every": ctx.cfg.accuracy.every,
            "max_truncated_fraction": ctx.cfg.accuracy.max_truncated_fraction,
            "model": ctx.ar_cfg.model.path, "trust_remote_code": ctx.cfg.model.trust_remote_code,
            "tensor_parallel_size": g.tensor_parallel_size if g.backend == "vllm" else None}


def curve_problem(ctx: RunContext, check: Callable[[], None]) -> str | None:
    """Run a curve check; with ``bottleneck.on_bad_curve=warn`` log and return its message instead."""
    from t3s.bottleneck import CurveError

    try:
        check()
    except CurveError as e:
        if ctx.cfg.bottleneck.on_bad_curve == "error":
            raise
        ctx.log(f"[t3s] WARNING (bottleneck.on_bad_curve=warn): {e}")
        return str(e)
    return None


def curve_check(ctx: RunContext, settings: dict):
    """Raise at the first evaluation (θ0) when most completions cannot show an answer."""
    from t3s.bottleneck import check_curve

    a = ctx.cfg.accuracy

    def check(step: int, metrics: dict) -> None:
        if step == 0:
            row = {"step": 0, **metrics}
            if a.verifier not in BUILTIN_VERIFIERS:
                row.pop("train_no_answer_fraction", None)
            curve_problem(ctx, lambda: check_curve(
                [row], max_truncated_fraction=a.max_truncated_fraction,
                max_new_tokens=settings["max_new_tokens"]["max_new_tokens"],
                longest_response=settings["max_new_tokens"].get("longest_response")))
    return check


def read_curve(ctx: RunContext) -> dict[int, float]:
    """``accuracy.curve`` as ``{step: accuracy}``; a malformed file is an error naming it."""
    path = ctx.cfg.accuracy.curve
    raw = read_json(path)
    try:
        return {int(k): float(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"accuracy.curve {path}: expected a JSON object {{step: accuracy}}") from None


def accuracy_hook(ctx: RunContext, *, use_curve: bool):
    """Training accuracy on a fixed subset of training prompts (or the precomputed curve)."""
    from t3s.train import accuracy_hook as make_hook

    a = ctx.cfg.accuracy
    curve = read_curve(ctx) if use_curve and a.curve else None
    idx = accuracy_subset(ctx)
    prompts = [ctx.examples[i].input_ids[: ctx.examples[i].response_start] for i in idx]
    golds = [ctx.records[i].answer for i in idx]
    if curve is None and any(g is None for g in golds):
        raise ValueError("training accuracy needs a gold answer on every training record (or accuracy.curve)")
    settings = accuracy_settings(ctx)
    hook = make_hook(prompts, golds, verifier=ctx.verifier(), batch_size=a.batch_size, curve=curve,
                     sampling=SamplingConfig(**settings["sampling"]),
                     check=curve_check(ctx, settings) if use_curve else None)
    if curve is not None:
        return hook

    def cached(recipe, step):  # every run starts from θ0: measure its accuracy once
        if step == 0 and "acc0" in ctx.cache:
            return dict(ctx.cache["acc0"])
        out = hook(recipe, step)
        if step == 0 and recipe.init_path == ctx.ar_cfg.model.path:
            ctx.cache["acc0"] = dict(out)
        return out

    return cached
