"""The T3S pipeline's stages, one module each, over one shared :class:`~t3s.pipeline_stages.context.RunContext`.

Each stage module has ``run(ctx, ...)`` (the stage's body) and ``stage(ctx, run, ...)`` (its
:class:`t3s.stages.Stage`: name, config keys, inputs, outputs). :mod:`t3s.pipeline` composes them in order;
:mod:`t3s.stages` (the bookkeeping engine) decides which to reuse.

    context          the run's config, tokenizer, records, examples, verifier, held-out set (loaded lazily)
    accuracy         training-accuracy settings, the accuracy hook, curve checks
    validate         everything checked before the first stage
    trajectory       sft_trajectory: baseline SFT from θ0 with training accuracy
    trajectory_eval  trajectory_eval: vLLM accuracy of the saved trajectory checkpoints
    bottleneck       bottleneck: θb from the curve
    profile          profile_base / profile_bottleneck: c_t at θ0 and θb
    delta            delta: Δc_t
    select           select: per-token selections
    probes           the probe examples and their anchor flags (diagnostics)
    train            train_<variant> (AR)
    train_dllm       train_<variant> in dLLM mode
    rrt              rrt: the reset-and-retrain checkpoint
    evaluate         eval_<model>: held-out accuracy
    loss_transfer    loss_transfer: paper Table 6 (optional)
    report           report
"""
