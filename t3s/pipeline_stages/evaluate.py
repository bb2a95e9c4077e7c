"""``eval_<model>``: held-out accuracy of θ0 or one variant, plus the share of completions in each named style
→ ``eval/<model>.json``. HF or vLLM generation; block-diffusion decoding in dLLM mode."""

from __future__ import annotations

import re

import numpy as np

from t3s import distributed as D
from t3s.io import write_json_atomic
from t3s.pipeline_stages.accuracy import sampling as sampling_settings
from t3s.pipeline_stages.context import RunContext, StageBody
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody, model: str) -> Stage:
    c = ctx.cfg
    return Stage(f"eval_{model}", run,
                 config=("eval", "accuracy.verifier", "model.dtype", "model.attn_implementation",
                         "model.trust_remote_code", "generation", "data.format", "data.adapter",
                         *(("dllm",) if ctx.dllm else ())),
                 inputs={"model": ctx.model_dir(model), "tokenizer": ctx.tokenizer_dir, "data.heldout": c.data.heldout,
                         "data.train": c.data.train},  # max_new_tokens may derive from the traces
                 outputs=(f"eval/{model}.json",))


def backend_for(ctx: RunContext, name: str):
    """The generation backend for one evaluated model (HF / vLLM; diffusion decoding in dLLM mode)."""
    from t3s.generate import HFBackend, VLLMBackend, stop_token_ids
    from t3s.train import load_model

    path, g, trust = ctx.model_dir(name), ctx.cfg.generation, ctx.cfg.model.trust_remote_code
    if ctx.dllm:
        from t3s.dllm import DiffusionBackend, resolve_dllm_config

        model = load_model(path, dtype=ctx.cfg.model.dtype, attn_implementation=ctx.cfg.model.attn_implementation,
                           device=D.device(), trust_remote_code=trust)
        return DiffusionBackend(model, ctx.tokenizer, resolve_dllm_config(ctx.cfg.dllm, ctx.tokenizer),
                                eos_token_ids=stop_token_ids(model, ctx.tokenizer), progress=ctx.progress,
                                desc=f"eval {name}")
    if g.backend == "vllm":
        if D.is_distributed():
            raise RuntimeError("eval with generation.backend=vllm runs in a single process: re-run `t3s run "
                               "CONFIG` without torchrun; finished stages are skipped")
        return VLLMBackend(path, tokenizer=ctx.tokenizer_dir,
                           tensor_parallel_size=g.tensor_parallel_size, dtype=g.dtype, trust_remote_code=trust,
                           gpu_memory_utilization=g.gpu_memory_utilization, max_model_len=g.max_model_len,
                           engine_kwargs=g.engine_kwargs)
    model = load_model(path, dtype=ctx.cfg.model.dtype, attn_implementation=ctx.cfg.model.attn_implementation,
                       device=D.device(), trust_remote_code=trust)
    return HFBackend(model, ctx.tokenizer, batch_size=ctx.cfg.eval.batch_size, progress=ctx.progress,
                     desc=f"eval {name}")


def run(ctx: RunContext, name: str) -> dict:
    from t3s.generate import answer_accuracy

    e = ctx.cfg.eval
    recs, prompts = ctx.heldout
    sampling, info = sampling_settings(ctx, "eval", [len(p) for p in prompts], ctx.model_dir(name))
    with backend_for(ctx, name) as backend:
        res = answer_accuracy(backend, ctx.tokenizer, prompts, [r.answer for r in recs],
                              verifier=ctx.verifier(), sampling=sampling, desc=f"eval {name}")
    styles = {k: float(np.mean([bool(re.search(p, c)) for c in res.completions]))
              for k, p in e.style_patterns.items()}
    n = sampling.num_samples
    out = {"model": name, "accuracy": res.accuracy, "correct": res.correct, "total": res.total,
           "truncated_fraction": res.truncated_fraction, "no_answer_fraction": res.no_answer_fraction,
           "backend": backend.name, "sampling": sampling.to_dict(), "max_new_tokens": info,
           "trust_remote_code": ctx.cfg.model.trust_remote_code,
           "decoding": "block-diffusion denoising (t3s.dllm.diffusion_generate)" if ctx.dllm else "autoregressive",
           "style_share": styles, "samples": [
               {"prompt": r.prompt, "gold": r.answer, "completion": res.completions[i * n],
                "correct": res.is_correct[i * n]} for i, r in enumerate(recs[:8])]}
    if D.is_main():
        write_json_atomic(ctx.run_dir / "eval" / f"{name}.json", out)
    ctx.log(f"[t3s]   {name}: held-out accuracy {res.accuracy:.3f} ({res.correct}/{res.total}"
            f"{f', {100 * res.truncated_fraction:.0f}% truncated' if res.truncated else ''})")
    return {"accuracy": res.accuracy}
