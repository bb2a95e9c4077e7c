"""``loss_transfer`` (``diagnostics.loss_transfer``), paper Table 6: train on one of four token subsets, measure
the loss change on all four → ``diagnostics/loss_transfer.json`` and ``diagnostics/loss_transfer/``."""

from __future__ import annotations

import copy

import numpy as np

from t3s import distributed as D
from t3s.io import write_json_atomic
from t3s.pipeline_stages.context import TRAINING_KEYS, RunContext, StageBody
from t3s.pipeline_stages.probes import anchors, probe_indices
from t3s.stages import Stage


def stage(ctx: RunContext, run: StageBody) -> Stage:
    r = ctx.run_dir
    inputs = {**ctx.model_inputs(ar=False), "delta": r / "delta", "selections/t3s": r / "selections" / "t3s"}
    return Stage("loss_transfer", run, config=(*TRAINING_KEYS, "accuracy", "diagnostics", "-accuracy.curve"),
                 inputs=inputs, outputs=("diagnostics/loss_transfer.json", "diagnostics/loss_transfer"))


def _base_logprobs(ctx: RunContext) -> list[np.ndarray]:
    """log p at θ0 of every response token, dense over each example's labels."""
    from t3s.profile import load_delta

    store = load_delta(ctx.run_dir / "delta")
    row = {rid: r for r, rid in enumerate(store.ids)}
    out = []
    for e in ctx.examples:
        dense = np.zeros(len(e.labels), dtype=np.float32)
        r = row[e.id]
        dense[store.column("positions", r)] = store.column("logprob_base", r)
        out.append(dense)
    return out


def run(ctx: RunContext) -> dict:
    from dataclasses import replace

    from t3s.diagnostics import SubsetLoss, loss_transfer_subsets, transfer_matrix
    from t3s.train import run_training

    subsets = loss_transfer_subsets(ctx.examples, anchors(ctx, ctx.examples), _base_logprobs(ctx))
    pidx = probe_indices(ctx)
    probe = [ctx.examples[i] for i in pidx]
    probe_subsets = {s: [m[i] for i in pidx] for s, m in subsets.items()}
    steps = ctx.cfg.diagnostics.loss_transfer_steps or ctx.cfg.train.steps
    cfg = copy.deepcopy(ctx.cfg)
    cfg.accuracy.every = steps
    cfg.train.keep_checkpoints = False
    before, after = None, {}
    for s, masks in subsets.items():
        ex = [replace(e, token_weight=[float(m) for m in mask]) for e, mask in zip(ctx.examples, masks, strict=True)]
        hook = SubsetLoss(probe, probe_subsets)
        seen: dict[int, dict] = {}
        res = run_training(cfg, ex, ctx.run_dir / "diagnostics" / "loss_transfer" / s, steps=steps,
                           evaluate=[lambda rc, st, h=hook, seen=seen: seen.setdefault(st, h(rc, st))],
                           save_final=False, name=f"transfer {s}", progress=ctx.progress)
        before = before or seen[0]
        after[s] = seen[res.steps_run]
    matrix = transfer_matrix(before, after)
    if D.is_main():
        write_json_atomic(ctx.run_dir / "diagnostics" / "loss_transfer.json",
                          {"steps": steps, "before": before, "after": after, "matrix_percent": matrix})
    return {}
