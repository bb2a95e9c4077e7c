"""Everything checked before the first stage, so a mistake costs seconds, not a trained stage."""

from __future__ import annotations

from t3s.config import check_dllm_pipeline
from t3s.pipeline_stages.accuracy import accuracy_subset, read_curve
from t3s.pipeline_stages.context import RunContext


def external_inputs(ctx: RunContext) -> dict[str, str]:
    """The files and folders outside the run directory that stages read, by config key."""
    c = ctx.cfg
    return {"model.path": c.model.path, "model.selector": c.model.selector or "",
            "model.tokenizer": c.model.tokenizer or "", "data.train": c.data.train,
            "data.heldout": c.data.heldout, "accuracy.curve": c.accuracy.curve or ""}


def validate(ctx: RunContext) -> None:
    """Paths, model and tokenizer, data, held-out set, verifier, vocabulary bounds."""
    from t3s.preflight import check_file, check_model_dir, check_tokenizer_dir, check_verifier, check_vocabulary

    c = ctx.cfg
    if ctx.dllm:
        check_dllm_pipeline(c)
    if not c.data.train:
        raise ValueError("data.train is not set: give the teacher traces (JSONL / Parquet / HF folder)")
    check_file("data.train", c.data.train)
    if not c.data.heldout:
        raise ValueError("data.heldout is not set: give held-out prompts with gold answers (the eval stages "
                         "need them; set it before training starts)")
    check_file("data.heldout", c.data.heldout)
    if c.accuracy.curve:
        check_file("accuracy.curve", c.accuracy.curve)
        read_curve(ctx)
    check_model_dir("model.path", c.model.path)
    if ctx.dllm:
        from t3s.preflight import check_dllm

        check_model_dir("model.selector", c.model.selector)
        check_dllm(c, ctx.tokenizer)
    check_tokenizer_dir("model.tokenizer" if c.model.tokenizer else "model.path", c.model.tokenizer or c.model.path)
    check_verifier("accuracy.verifier", c.accuracy.verifier)
    examples = ctx.examples  # loads and tokenizes the data: data errors surface now
    if not c.accuracy.curve and any(ctx.records[i].answer is None for i in accuracy_subset(ctx)):
        raise ValueError("training accuracy needs a gold answer on every training record (or accuracy.curve)")
    check_vocabulary(c.model.path, ctx.tokenizer, (e.input_ids for e in examples), what="data.train")
    _, prompts = ctx.heldout
    check_vocabulary(c.model.path, ctx.tokenizer, prompts, what="data.heldout")
