"""Every choice the paper leaves open, the value a run uses and why: one list for the config docs and the report.

:func:`paper_silent_choices` reads the values from a run's config (and, for ``train.mode=dllm``, the resolved
block-diffusion options), so a report prints what the run ran with, never a hard-coded default.
"""

from __future__ import annotations

import textwrap
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")" if value else "none"
    return "None" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def paper_silent_choices(cfg: Any, dllm: dict | None = None, *, include_dllm: bool = True
                         ) -> list[dict[str, str]]:
    """``[{"choice", "keys", "value", "why"}]`` for ``cfg`` (a :class:`t3s.config.Config`).

    ``dllm``: the resolved :class:`t3s.dllm.DLLMConfig` as a dict; without it the dLLM rows name the keys and
    show only what ``cfg.dllm`` sets.
    """
    o, a, b, s, d = cfg.optim, cfg.accuracy, cfg.bottleneck, cfg.select, cfg.diagnostics
    dl = {**(dllm or {}), **(cfg.dllm or {})}

    def dv(key: str) -> str:
        return _fmt(dl[key]) if key in dl else "DLLMConfig default"

    rows = [
        ("Adam betas / eps", "optim.betas, optim.eps", f"{_fmt(o.betas)}, {_fmt(o.eps)}",
         "the paper gives only lr 1e-5, batch 64, 50 steps; β2 = 0.95 is the usual LLM fine-tuning value"),
        ("weight decay", "optim.weight_decay", _fmt(o.weight_decay),
         "50 steps of continual distillation; no decay keeps θf − θb (RRT) made of gradient updates only"),
        ("learning-rate schedule", "optim.schedule, optim.warmup_steps, optim.min_lr_ratio",
         f"{o.schedule}, warm-up {o.warmup_steps}, to {_fmt(o.min_lr_ratio)} x lr",
         "not stated; the default, cosine to 0 without warm-up, is common for short SFT (AR and dLLM share the code)"),
        ("gradient clipping", "optim.max_grad_norm", _fmt(o.max_grad_norm), "not stated; the usual global-norm 1.0"),
        ("training-accuracy protocol", "accuracy.temperature, num_samples, num_prompts, max_new_tokens, every",
         f"{'greedy' if a.temperature == 0 else f'T={_fmt(a.temperature)}'}, {a.num_samples} sample(s), "
         f"{a.num_prompts or 'all'} seeded prompts, max_new_tokens {a.max_new_tokens or 'longest training response'}"
         f", every {a.every} step(s)",
         "the paper measures training-set accuracy at every checkpoint but not how; greedy on a fixed seeded "
         "subset is cheap and deterministic, and a limit below the longest response would hide answers"),
        ("θb ties, θ0, noise", "bottleneck.min_step, on_no_shock",
         f"earliest of ties; min_step {b.min_step}; no shock: {b.on_no_shock}; noise: 2 binomial SE",
         "Eq. 1 includes θ0 and says nothing of ties or of a curve without a shock; the drop is checked against "
         "the accuracy's own sampling noise"),
        ("loss normaliser", "(fixed)", "Σ kept-token loss / kept tokens per optimizer step (all ranks)",
         "not stated; each kept token weighs about total/kept times what it weighs under SFT, so the update "
         "size per step stays that of SFT"),
        ("end-of-sequence tokens in the mask", "select.always_train_eos, select.end_token_ids",
         f"{s.always_train_eos} (extra ids {_fmt(s.end_token_ids)})",
         "not stated; with the bare Δc > 0 rule a student whose EOS confidence rose stops learning to stop"),
        ("baseline ranking", "select.ranking", s.ranking,
         "Appendix K: \"the same token fraction\", not whether ranked over the dataset or per sequence; either "
         "way the baselines mask exactly as many tokens as T3S after the end-token exemption"),
        ("dLLM block size", "dllm.block_size", dv("block_size"), "not stated; LLaDA2.0 uses 32"),
        ("dLLM noise window", "dllm.eps_min, dllm.eps_max", f"{dv('eps_min')}, {dv('eps_max')}",
         "not stated; BD3-LM's [1e-3, 1]"),
        ("dLLM noise level", "dllm.t_mode", dv("t_mode"), "not stated; one level per block as in BD3-LM"),
        ("one-step intervention (Fig. 5)", "diagnostics.intervention_lr",
         f"lr·sign(g) (a first Adam step), lr {_fmt(d.intervention_lr or o.lr)}",
         "the paper does not give the update; a first Adam step is what training would take next"),
        ("Table 6 easy/hard split", "(fixed)", "anchors and others each split at their median base confidence",
         "not stated; the median gives equal halves"),
        ("end tokens in the diagnostics", "(fixed)", "anchor / other as the T3S mask has them (with "
         "always_train_eos never masked, so \"other\")", "not stated; the diagnostics follow the mask T3S trains with"),
    ]
    if not include_dllm:
        rows = [r for r in rows if not r[1].startswith("dllm.")]
    return [{"choice": c, "keys": k, "value": v, "why": w} for c, k, v, w in rows]


def choices_markdown(cfg: Any, dllm: dict | None = None) -> list[str]:
    """The list as a markdown table (the report's section; the dLLM rows only for a dLLM run)."""
    lines = ["| choice | config | value in this run | why |", "|---|---|---|---|"]
    for r in paper_silent_choices(cfg, dllm, include_dllm=cfg.train.mode == "dllm"):
        lines.append(f"| {r['choice']} | `{r['keys']}` | {r['value']} | {r['why']} |")
    return lines


def choices_comment(cfg: Any) -> list[str]:
    """The list as YAML comment lines (the config docs)."""
    lines = ["# Choices the paper leaves open (value: the default; why). Each run's report prints the values it ran",
             "# with (report section \"Choices the paper leaves open\").", "#"]
    for r in paper_silent_choices(cfg):
        lines += textwrap.wrap(f"{r['choice']} [{r['keys']}]: {r['value']}.", 108, initial_indent="#   ",
                               subsequent_indent="#       ")
        lines += textwrap.wrap(f"{r['why']}.", 108, initial_indent="#       ", subsequent_indent="#       ")
    return lines
