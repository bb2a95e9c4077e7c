"""What the demo reports beyond the pipeline's own table: accuracy per problem family, whether the SFT
trajectory showed Imitation Shock, and mean ± sd over seeds.

``evaluate_families`` greedy-decodes every evaluated model on each family's held-out problems (the pipeline
evaluates both families together) and writes ``RUN_DIR/demo/families.json`` atomically; ``seed_summary``
reads one such file per seed and ``format_seed_tables`` prints the aggregate and per-seed tables.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from t3s.demo.regime import measure_regime
from t3s.demo.task import FAMILIES
from t3s.io import read_json, write_json_atomic

SHOCK_RATIO = 0.5
"""A trajectory shows Imitation Shock when its lowest training accuracy is at most this fraction of θ0's."""

B_STYLE = "teacher_b_boxed"  # the eval.style_patterns key that marks teacher B's answer style

LABELS = {"base": "θ0 (base)", "sft": "SFT", "t3s": "T3S", "neg_t3s": "−T3S",
          "static_high_conf": "mask highest base conf.", "static_low_conf": "mask lowest base conf.",
          "random": "random mask", "rrt": "RRT θ0+(θf−θb)"}


def trajectory_shock(run_dir: str | Path) -> dict:
    """Training accuracy of the SFT trajectory: at θ0, its minimum (and step), its last value, shock or not."""
    from t3s.report import read_metrics

    rows = [r for r in read_metrics(Path(run_dir) / "trajectory" / "metrics.jsonl")
            if r.get("train_accuracy") is not None]
    if not rows:
        raise ValueError(f"{run_dir}: the SFT trajectory recorded no training accuracy")
    start = rows[0]["train_accuracy"]
    low = min(rows, key=lambda r: r["train_accuracy"])
    return {"start": start, "min": low["train_accuracy"], "min_step": low["step"], "last": rows[-1]["train_accuracy"],
            "shock": start > 0 and low["train_accuracy"] <= SHOCK_RATIO * start}


def evaluate_families(run_dir: str | Path, cfg, family_paths: dict, *, log: Callable[[str], None] = print) -> dict:
    """Held-out accuracy and style shares per family for θ0 and every variant; cached in ``demo/families.json``."""
    from t3s import distributed as D
    from t3s.generate import answer_accuracy, encode_prompt
    from t3s.pipeline import Pipeline, load_eval_records

    run = Path(run_dir)
    out_path = run / "demo" / "families.json"
    models = ["base", *cfg.variants]
    families = [f for f in FAMILIES if f in family_paths] + sorted(set(family_paths) - set(FAMILIES))
    if out_path.exists():
        cached = read_json(out_path)
        if cached.get("models") == models and cached.get("families") == families and "regime" in cached:
            return cached
    from t3s.train import load_model

    pipe = Pipeline(cfg, log=log, progress=False)
    tok, e = pipe.tokenizer, cfg.eval
    verifier = pipe._verifier()
    sets = {}
    for fam in families:
        recs = load_eval_records(str(family_paths[fam]))
        sets[fam] = (recs, [encode_prompt(tok, r.prompt) for r in recs])
    result: dict = {"models": models, "families": families, "accuracy": {}, "style_share": {}}
    for name in models:
        model = load_model(pipe.model_dir(name), dtype=cfg.model.dtype,
                           attn_implementation=cfg.model.attn_implementation, device=D.device())
        acc, style = {}, {}
        for fam, (recs, prompts) in sets.items():
            res = answer_accuracy(model, tok, prompts, [r.answer for r in recs], verifier=verifier,
                                  max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
            acc[fam] = res.accuracy
            style[fam] = {k: sum(bool(re.search(p, c)) for c in res.completions) / len(res.completions)
                          for k, p in e.style_patterns.items()}
        result["accuracy"][name], result["style_share"][name] = acc, style
        log(f"[demo]   {name}: " + ", ".join(f"{f} family {a:.3f}" for f, a in acc.items()))
    result["trajectory"] = trajectory_shock(run)
    sel = run / "selections" / "t3s" / "selection.json"
    result["masked_fraction_t3s"] = read_json(sel)["stats"]["selected_fraction"] if sel.exists() else None
    prov = run / "delta" / "provenance.json"
    result["anchor_fraction"] = read_json(prov).get("anchor_fraction") if prov.exists() else None
    bn = run / "bottleneck.json"
    result["bottleneck_step"] = read_json(bn)["step"] if bn.exists() else None
    new_skill = (cfg.demo.get("task") or {}).get("new_skill", "chain")
    result["regime"] = measure_regime(run, tok, new_skill=new_skill, threshold=cfg.select.threshold,
                                      always_train_eos=cfg.select.always_train_eos)
    log("[demo] " + format_regime(result["regime"]))
    if D.is_main():
        write_json_atomic(out_path, result)
    return result


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _b_share(res: dict, name: str) -> float:
    st = res["style_share"][name]
    return sum(st[f].get(B_STYLE, 0.0) for f in st) / len(st)


def seed_summary(results: dict[int, dict]) -> dict:
    """Mean ± sd per model and family over seeds, and how many seeds showed the shock."""
    seeds = sorted(results)
    first = results[seeds[0]]
    models, fams = first["models"], first["families"]
    rows = {}
    for name in models:
        row = {f: _mean_sd([results[s]["accuracy"][name][f] for s in seeds]) for f in fams}
        row["b_style"] = _mean_sd([_b_share(results[s], name) for s in seeds])
        rows[name] = row
    shocks = [results[s]["trajectory"]["shock"] for s in seeds]
    return {
        "seeds": seeds, "models": models, "families": fams, "rows": rows,
        "shock_seeds": sum(shocks),
        "anchor_fraction": _mean_sd([results[s]["anchor_fraction"] for s in seeds
                                     if results[s]["anchor_fraction"] is not None] or [float("nan")]),
        "masked_fraction": _mean_sd([results[s]["masked_fraction_t3s"] for s in seeds
                                     if results[s]["masked_fraction_t3s"] is not None] or [float("nan")]),
    }


def format_seed_tables(results: dict[int, dict]) -> str:
    """Markdown: mean ± sd per model and family, then one row per seed."""
    s = seed_summary(results)
    k = len(s["seeds"])
    fams = s["families"]
    lines = [f"Over {k} seed{'s' if k > 1 else ''} ({', '.join(map(str, s['seeds']))}): Imitation Shock (SFT "
             f"training accuracy down to ≤ {SHOCK_RATIO:.0%} of θ0's) in {s['shock_seeds']}/{k}; anchors (Δc > 0) "
             f"{100 * s['anchor_fraction'][0]:.1f} ± {100 * s['anchor_fraction'][1]:.1f} % of response tokens, "
             f"T3S masks {100 * s['masked_fraction'][0]:.1f} ± {100 * s['masked_fraction'][1]:.1f} %.", "",
             "| model | " + " | ".join(f"{f} family acc" for f in fams) + " | writes B's style |",
             "|---|" + "---|" * (len(fams) + 1)]
    for name in s["models"]:
        r = s["rows"][name]
        cells = [f"{r[f][0]:.3f} ± {r[f][1]:.3f}" for f in fams] + [f"{100 * r['b_style'][0]:.0f} %"]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (held-out accuracy old / new family):", "",
              "| seed | shock (train acc θ0 → min @ step → last) | θb | anchors | "
              + " | ".join(LABELS.get(m, m) for m in s["models"]) + " |",
              "|---|---|---|---|" + "---|" * len(s["models"])]
    for seed in s["seeds"]:
        res = results[seed]
        t = res["trajectory"]
        cells = [str(seed), f"{'yes' if t['shock'] else 'no'} ({t['start']:.2f} → {t['min']:.2f} @ {t['min_step']} → "
                 f"{t['last']:.2f})", str(res["bottleneck_step"]),
                 f"{100 * res['anchor_fraction']:.1f} %" if res["anchor_fraction"] is not None else "–"]
        cells += ["{:.2f} / {:.2f}".format(*(res["accuracy"][m][f] for f in fams)) for m in s["models"]]
        lines.append("| " + " | ".join(cells) + " |")
    if all({"t3s", "sft"} <= set(results[seed]["accuracy"]) for seed in s["seeds"]):
        lines += ["", format_claim(results)]
    if any(results[seed].get("regime") for seed in s["seeds"]):
        lines += ["", *_regime_rows(results)]
    return "\n".join(lines)


CURVE_POINTS = 9
"""At most this many steps (the first and the last included) of the SFT and T3S training-accuracy curves are
printed."""


def format_curves(reg: dict) -> str:
    """``step: SFT / T3S`` training accuracy at the steps both runs measured (at most :data:`CURVE_POINTS`)."""
    sft = {int(step): acc for step, acc in reg["curves"]["sft"]}
    t3s = {int(step): acc for step, acc in reg["curves"]["t3s"]}
    steps = sorted(set(sft) & set(t3s))
    if len(steps) > CURVE_POINTS:
        stride = math.ceil((len(steps) - 1) / (CURVE_POINTS - 1))
        steps = sorted({*steps[::stride], steps[-1]})
    return ", ".join(f"{s}: {sft[s]:.2f} / {t3s[s]:.2f}" for s in steps)


def format_regime(reg: dict) -> str:
    """One line: the precondition numbers of the regime (see :mod:`t3s.demo.regime`) and both accuracy curves."""
    curve = format_curves(reg)
    return (f"regime: new-family equation tokens with Δc ≤ 0 {100 * reg['content_nonpos']:.0f} % (the new skill's own "
            f"tokens {100 * reg['skill_nonpos']:.0f} %); B's marker masked {100 * reg['marker_masked']:.0f} %; "
            f"T3S masks {100 * reg['masked_fraction']:.1f} %, Jaccard with the same-size lowest-c(θ0) mask "
            f"{reg['jaccard_low_conf']:.2f}; θ0's loss on the tokens T3S keeps {reg['loss0_kept']:.3f} nats vs "
            f"{reg['loss0_all']:.3f} on all (SFT), {reg['loss0_skill']:.3f} on the skill's tokens; training accuracy "
            f"SFT / T3S at step {curve}")


def _regime_rows(results: dict[int, dict]) -> list[str]:
    lines = ["Regime per seed (measured before any comparison; t3s/demo/regime.py):", "",
             "| seed | new-family equation tokens Δc ≤ 0 | skill tokens Δc ≤ 0 | B's marker masked | anchors "
             "| Jaccard T3S vs low-conf mask | θ0 loss: T3S-kept / all | train acc SFT: θ0 → min → last "
             "| train acc T3S: θ0 → min → last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seed in sorted(results):
        reg = results[seed].get("regime")
        if reg is None:
            continue
        cells = [str(seed), f"{100 * reg['content_nonpos']:.0f} %", f"{100 * reg['skill_nonpos']:.0f} %",
                 f"{100 * reg['marker_masked']:.0f} %", f"{100 * results[seed]['anchor_fraction']:.1f} %",
                 f"{reg['jaccard_low_conf']:.2f}", f"{reg['loss0_kept']:.3f} / {reg['loss0_all']:.3f}"]
        for name in ("sft", "t3s"):
            accs = [a for _, a in reg["curves"][name]]
            cells.append(f"{accs[0]:.2f} → {min(accs):.2f} → {accs[-1]:.2f}" if accs else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Training accuracy, SFT / T3S, at step:", ""]
    lines += [f"- seed {seed}: {format_curves(results[seed]['regime'])}" for seed in sorted(results)
              if results[seed].get("regime")]
    return lines


def claim_check(results: dict[int, dict], family: str = "new") -> dict:
    """The pre-registered comparison: T3S vs SFT on ``family``'s held-out accuracy, per seed and on the mean."""
    seeds = sorted(results)
    diffs = [results[s]["accuracy"]["t3s"][family] - results[s]["accuracy"]["sft"][family] for s in seeds]
    wins = sum(d > 0 for d in diffs)
    mean_t3s = _mean_sd([results[s]["accuracy"]["t3s"][family] for s in seeds])[0]
    mean_sft = _mean_sd([results[s]["accuracy"]["sft"][family] for s in seeds])[0]
    return {"wins": wins, "seeds": len(seeds), "mean_t3s": mean_t3s, "mean_sft": mean_sft,
            "holds": wins >= math.ceil(0.8 * len(seeds)) and mean_t3s > mean_sft}


def format_claim(results: dict[int, dict]) -> str:
    c = claim_check(results)
    return (f"Pre-registered claim (T3S beats SFT on the new family's held-out accuracy in ≥ 4 of 5 seeds, i.e. "
            f"≥ 80 % of them, and on the mean): T3S wins in {c['wins']}/{c['seeds']} seeds; mean {c['mean_t3s']:.3f} "
            f"vs SFT {c['mean_sft']:.3f}; the claim {'holds' if c['holds'] else 'does not hold'}.")
