"""The run's report: a results table and PNG plots, every number read from the run directory.

``report/report.md`` holds the variant × held-out accuracy table (with the last training accuracy, the share
of completions in each configured style, and the paper's published numbers only when ``paper_reference``
names the matching setting — always in their own, labelled column), the bottleneck, the selection
statistics and the plots:

* ``training_dynamics.png`` — loss and training accuracy per step, SFT vs T3S (and the other variants), the
  bottleneck marked;
* ``delta_c.png`` — the distribution of Δc_t with the anchor threshold;
* ``group_dprob.png`` — mean Δ-probability of anchors vs other tokens per checkpoint (SFT and T3S runs);
* ``grad_stats.png`` — anchor/other gradient-norm ratio and cosine per checkpoint (SFT run);
* ``intervention.png`` — paper Fig. 5 (``diagnostics.anchor_intervention``): the other tokens' loss change after
  one anchor-only update, and the anchor loss, per checkpoint of the SFT run;
* the 4×4 loss-transfer matrix as a table when that stage ran.

Warnings name what departs from the paper's setting: an anchor share far from ≈ 20 % (AR, Δc > 0), a dLLM target
share far from ≈ 5 % (τ = 0.2), masked end tokens, truncated evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from t3s.config import Config
from t3s.io import read_json, stage_info, write_atomic, write_json_atomic, write_text_atomic

# The paper's shares: anchors (Δc > 0) ≈ 20 % of response tokens (static baselines "mask the same token fraction
# as T3S (about 20 %)", §4 / App. K); dLLM targets at τ = 0.2 ≈ 5 % (5.24 %, Table 11). A share outside
# [share / 2, 2 · share] is flagged: the run differs from the paper's regime in a way worth knowing.
PAPER_ANCHOR_SHARE = 0.20
PAPER_TARGET_SHARE = 0.05

# Published numbers (AIME24 / AIME25 average, Qwen3-8B student) from the paper's Table 3 and Table 19, shown
# only when ``paper_reference`` names one of these settings. They are the paper's results, never the run's.
PAPER_REFERENCE = {
    "boba200_r1": {"source": "paper Table 3 / Table 19 (Qwen3-8B, BOBA-200, DeepSeek-R1 teacher, AIME24/25 avg)",
                   "base": 71.46, "sft": 63.13, "rrt": 72.61, "neg_t3s": 28.13, "t3s": 77.30,
                   "static_high_conf": 63.34, "static_low_conf": 68.34},
    "s1k200_r1": {"source": "paper Table 3 (Qwen3-8B, S1K-200, DeepSeek-R1 teacher, AIME24/25 avg)",
                  "base": 71.46, "sft": 64.17, "rrt": 73.65, "neg_t3s": 26.67, "t3s": 76.57},
    "boba200_qwq": {"source": "paper Table 3 (Qwen3-8B, BOBA-200, QwQ teacher, AIME24/25 avg)",
                    "base": 71.46, "sft": 70.83, "rrt": 72.61, "neg_t3s": 41.67, "t3s": 74.17},
    "s1k200_qwq": {"source": "paper Table 3 (Qwen3-8B, S1K-200, QwQ teacher, AIME24/25 avg)",
                   "base": 71.46, "sft": 68.33, "rrt": 73.33, "neg_t3s": 43.33, "t3s": 74.59},
}

LABELS = {"base": "base (θ0)", "sft": "SFT", "t3s": "T3S", "neg_t3s": "−T3S", "static_high_conf":
          "mask highest base confidence", "static_low_conf": "mask lowest base confidence",
          "random": "random mask", "rrt": "RRT θ0+(θf−θb)"}


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def collect(run_dir: str | Path) -> dict:
    """Everything the report shows, read from the run directory."""
    run = Path(run_dir)
    out: dict = {"bottleneck": read_json(run / "bottleneck.json") if (run / "bottleneck.json").exists() else None,
                 "trajectory": read_metrics(run / "trajectory" / "metrics.jsonl"), "variants": {}, "eval": {},
                 "selections": {}}
    for d in sorted((run / "variants").glob("*")) if (run / "variants").exists() else []:
        out["variants"][d.name] = read_metrics(d / "metrics.jsonl")
    for f in sorted((run / "eval").glob("*.json")) if (run / "eval").exists() else []:
        out["eval"][f.stem] = read_json(f)
    for d in sorted((run / "selections").glob("*")) if (run / "selections").exists() else []:
        if (d / "selection.json").exists():
            stats = read_json(d / "selection.json")["stats"]
            out["selections"][d.name] = {k: v for k, v in stats.items() if k != "per_example"}
    lt = run / "diagnostics" / "loss_transfer.json"
    out["loss_transfer"] = read_json(lt) if lt.exists() else None
    ev = run / "trajectory" / "evaluation.json"
    out["accuracy_settings"] = read_json(ev) if ev.exists() else None
    rrt = stage_info(run, "rrt") or {}
    out["rrt"] = rrt.get("info", rrt)  # the stage's own return value (t3s.stages keeps it under "info")
    return out


def no_shock_note(bn: dict) -> str | None:
    """What a missing or noise-level Imitation Shock means for this run (None when the shock is clear)."""
    shock = bn.get("shock")
    if not shock or shock.get("clear"):
        return None
    if shock["shock"]:
        return f"{shock['message']}."
    if bn.get("step") == 0:
        return (f"{shock['message']}. θb = θ0 here (bottleneck.on_no_shock=proceed): every Δc is 0, so T3S equals "
                "SFT (nothing is masked) and RRT = θ0 + (θf − θ0) = θf, the SFT model.")
    return (f"{shock['message']}. θb is step {bn['step']} only because bottleneck.min_step={bn.get('min_step')} "
            "leaves θ0 out (a departure from Eq. 1; bottleneck.on_no_shock=proceed): its Δc is not the paper's.")


def share_warnings(data: dict, *, mode: str = "ar") -> list[str]:
    """Departures from the paper's regime worth a reader's attention (empty when none)."""
    warn = []
    bn = data.get("bottleneck") or {}
    if bn.get("curve_problem"):
        warn.append(f"θb is unreliable (bottleneck.on_bad_curve=warn): {bn['curve_problem']}")
    shock_note = no_shock_note(bn)
    if shock_note:
        warn.append(shock_note)
    sel = data["selections"]
    t3s = sel.get("t3s")
    if mode == "ar" and t3s:
        share = t3s.get("anchor_fraction", t3s["selected_fraction"])
        if not PAPER_ANCHOR_SHARE / 2 <= share <= 2 * PAPER_ANCHOR_SHARE:
            warn.append(f"anchor share {100 * share:.1f}% of response tokens (Δc > {t3s.get('anchor_cut', 0):g}) is "
                        f"far from the paper's ≈ {100 * PAPER_ANCHOR_SHARE:.0f}%: θb may be off (check the accuracy "
                        "curve), or the student / data differ from the paper's regime")
    tg = sel.get("dllm_targets")
    if tg:
        share = tg["selected_fraction"]
        if not PAPER_TARGET_SHARE / 2 <= share <= 2 * PAPER_TARGET_SHARE:
            warn.append(f"dLLM target share {100 * share:.2f}% (Δc < −τ) is far from the paper's ≈ "
                        f"{100 * PAPER_TARGET_SHARE:.0f}% at τ = 0.2 (Table 11: 10.4% at τ = 0.1, 2.5% at τ = 0.3); "
                        "consider adjusting select.tau")
    for rule, st in sel.items():
        if st.get("meaning") == "loss_weight" and st.get("end_tokens") and st.get("end_selected"):
            warn.append(f"{rule}: {st['end_selected']}/{st['end_tokens']} end-of-sequence / end-of-turn tokens are "
                        "masked (select.always_train_eos=false): a student that stops training on them may stop ending")
    for name, e in data["eval"].items():
        if e.get("truncated_fraction", 0) > 0.5:
            warn.append(f"eval {name}: {100 * e['truncated_fraction']:.0f}% of completions hit max_new_tokens "
                        f"({e.get('max_new_tokens', {}).get('max_new_tokens')}); its accuracy undercounts")
    return warn


def _save(fig, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _plt().close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_dynamics(data: dict, path: Path) -> Path | None:
    plt = _plt()
    runs = {"SFT trajectory": data["trajectory"], **{LABELS.get(k, k): v for k, v in data["variants"].items()}}
    if not any(runs.values()):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    for name, rows in runs.items():
        # The trajectory (θb search) is drawn wide and faint: the SFT variant follows it exactly.
        kw = dict(color="grey", lw=4, alpha=0.35) if name == "SFT trajectory" else {}
        x, y = _series(rows, "loss")
        if x:
            ax1.plot(x, y, label=name, **kw)
        x, y = _series(rows, "train_accuracy")
        if x:
            ax2.plot(x, y, marker="." if not kw else None, label=name, **kw)
    bn = data["bottleneck"]
    if bn:
        for ax in (ax1, ax2):
            ax.axvline(bn["step"], color="red", ls=":", lw=1)
        ax2.annotate(f"θb (step {bn['step']})", (bn["step"], bn["accuracy"] or 0), color="red", fontsize=8,
                     xytext=(5, 5), textcoords="offset points")
    ax1.set(xlabel="optimizer step", ylabel="training loss (trained tokens)", title="Loss")
    ax2.set(xlabel="optimizer step", ylabel="training accuracy", title="Training accuracy", ylim=(-0.02, 1.02))
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_delta_c(run_dir: Path, threshold: float, path: Path) -> tuple[Path | None, dict]:
    from t3s.profile import load_delta

    if not (run_dir / "delta" / "provenance.json").exists():
        return None, {}
    delta = load_delta(run_dir / "delta").flat("delta_c").astype(np.float64)
    if not delta.size:
        return None, {}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(delta, bins=80, color="steelblue")
    ax.axvline(threshold, color="red", ls=":", label=f"anchor cut Δc > {threshold:g}")
    ax.set(xlabel="Δc_t = c_t(θb) − c_t(θ0)", ylabel="tokens", title="Δc distribution", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    stats = {"tokens": int(delta.size), "mean": float(delta.mean()), "median": float(np.median(delta)),
             "anchor_fraction": float((delta > threshold).mean())}
    return path, stats


def plot_groups(data: dict, path: Path, bn_step: int | None) -> Path | None:
    plt = _plt()
    runs = {k: v for k, v in data["variants"].items() if any("dprob_anchor" in r for r in v)}
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], runs.items(), strict=True):
        for key, label in (("dprob_anchor", "anchor tokens"), ("dprob_other", "other tokens")):
            x, y = _series(rows, key)
            ax.plot(x, y, marker=".", label=label)
        if bn_step is not None:
            ax.axvline(bn_step, color="red", ls=":", lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="optimizer step", ylabel="mean Δ probability vs θ0", title=f"{LABELS.get(name, name)} run")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def _pair(path: Path, bn_step: int | None, draw) -> Path:
    """A two-panel figure of the SFT run with the bottleneck marked on both panels."""
    fig, (a1, a2) = _plt().subplots(1, 2, figsize=(10, 3.6))
    draw(a1, a2)
    for ax in (a1, a2):
        if bn_step is not None:
            ax.axvline(bn_step, color="red", ls=":", lw=1)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_grad_stats(data: dict, path: Path, bn_step: int | None) -> Path | None:
    rows = data["variants"].get("sft", [])
    x1, ratio = _series(rows, "grad_norm_ratio")
    x2, cos = _series(rows, "grad_cosine")
    if not x1:
        return None

    def draw(a1, a2):
        a1.plot(x1, ratio, marker=".")
        a1.set(xlabel="optimizer step", ylabel="‖g_anchor‖ / ‖g_other‖", title="Gradient-norm ratio (SFT run)")
        a2.plot(x2, cos, marker=".", color="purple")
        a2.axhline(0, color="grey", lw=0.5)
        a2.set(xlabel="optimizer step", ylabel="cos(g_anchor, g_other)", title="Gradient cosine (SFT run)")

    return _pair(path, bn_step, draw)


def plot_intervention(data: dict, path: Path, bn_step: int | None) -> Path | None:
    rows = data["variants"].get("sft", [])
    x1, d_other = _series(rows, "intervention_anchor_step_dloss_other")
    x2, l_anchor = _series(rows, "loss_anchor")
    if not x1:
        return None
    x3, d_self = _series(rows, "intervention_other_step_dloss_other")

    def draw(a1, a2):
        a1.plot(x1, d_other, marker=".", label="anchor-only step → ΔL_other")
        if x3:
            a1.plot(x3, d_self, marker=".", ls="--", label="other-only step → ΔL_other")
        a1.axhline(0, color="grey", lw=0.5)
        a1.set(xlabel="checkpoint (optimizer step)", ylabel="Δ loss on other tokens", title="One-step intervention")
        a1.legend(fontsize=7)
        a2.plot(x2, l_anchor, marker=".", color="darkorange")
        a2.set(xlabel="checkpoint (optimizer step)", ylabel="anchor-token loss", title="Anchor loss (SFT run)")

    return _pair(path, bn_step, draw)


def results_table(data: dict, cfg: Config) -> tuple[list[dict], str]:
    """Rows (one per evaluated model) and their markdown table."""
    paper = PAPER_REFERENCE.get(cfg.paper_reference or "")
    styles = sorted({k for e in data["eval"].values() for k in e.get("style_share", {})})
    order = ["base", *cfg.variants]
    rows = []
    for name in order:
        e = data["eval"].get(name)
        if e is None:
            continue
        curve = _series(data["variants"].get(name, []), "train_accuracy")[1]
        rule = name if cfg.train.mode == "ar" else ("dllm_targets" if name == "t3s" else "")
        sel = data["selections"].get(rule, {})
        rows.append({"model": name, "heldout_accuracy": e["accuracy"], "correct": e["correct"], "total": e["total"],
                     "final_train_accuracy": curve[-1] if curve else None,
                     "min_train_accuracy": min(curve) if curve else None,
                     "masked_fraction": sel.get("selected_fraction"), "style_share": e.get("style_share", {}),
                     "paper": paper.get(name) if paper else None})
    head = ["model", "held-out acc", "train acc (min → last)", "masked tokens"]
    head += [f"{s} style" for s in styles]
    if paper:
        head.append("paper (their setting)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tr = (f"{r['min_train_accuracy']:.2f} → {r['final_train_accuracy']:.2f}"
              if r["final_train_accuracy"] is not None else "–")
        cells = [LABELS.get(r["model"], r["model"]), f"{r['heldout_accuracy']:.3f} ({r['correct']}/{r['total']})", tr,
                 f"{100 * r['masked_fraction']:.1f}%" if r["masked_fraction"] is not None else "–"]
        cells += [f"{100 * r['style_share'].get(s, 0.0):.0f}%" for s in styles]
        if paper:
            cells.append(f"{r['paper']:.2f}" if r["paper"] is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if paper:
        table += f"\n\nThe last column is **not from this run**: {paper['source']}."
    return rows, table


def _choices(cfg: Config) -> list[str]:
    from dataclasses import asdict

    from t3s.choices import choices_markdown

    dllm = None
    if cfg.train.mode == "dllm":
        from t3s.dllm import DLLMConfig

        dllm = asdict(DLLMConfig.from_dict(cfg.dllm))
    return choices_markdown(cfg, dllm)


def _training_section(data: dict, bn: dict | None) -> list[str]:
    """Report lines on θb, the training-accuracy settings and RRT."""
    from t3s.bottleneck import describe

    md: list[str] = []
    if bn:
        acc = bn["accuracy"] if bn["accuracy"] is None else format(bn["accuracy"], ".3f")
        md += ["## Imitation Bottleneck", "",
               f"θb = step {bn['step']} of the SFT trajectory, training accuracy {acc}; chosen by "
               f"{bn.get('description') or describe(bn)}. The trajectory ran {bn.get('trajectory_steps')} steps"
               + (" and stopped early" if bn.get("stopped_early") else "") + ".", ""]
    st = data.get("accuracy_settings")
    if st:
        mnt = st["max_new_tokens"]
        sp = st["sampling"]
        md += [f"Training accuracy: {st['num_prompts']} training prompts every {st['every']} steps, backend "
               f"`{st['backend']}`, max_new_tokens {mnt['max_new_tokens']} ({mnt['derived_from']}; longest training "
               f"response {mnt.get('longest_response')} tokens), "
               + ("greedy" if sp["temperature"] == 0 else f"T={sp['temperature']:g} top-p {sp['top_p']:g}, "
                  f"{sp['num_samples']} samples") + ".", ""]
        trunc = _series(data["trajectory"], "train_truncated_fraction")[1]
        if trunc:
            md += [f"Truncated completions over the trajectory: mean {100 * float(np.mean(trunc)):.1f}%, max "
                   f"{100 * max(trunc):.1f}%.", ""]
    if data.get("rrt"):
        md += [f"RRT: θ0 + (θf − θb) with θf = `{data['rrt'].get('theta_f')}`.", ""]
    return md


def _selection_section(data: dict, delta_stats: dict | None, threshold: float) -> list[str]:
    """Report lines on Δc, the selections and the loss-transfer matrix."""
    md: list[str] = []
    if delta_stats:
        md += ["## Δc_t", "", f"{delta_stats['tokens']} response tokens; mean Δc {delta_stats['mean']:.3f}, median "
               f"{delta_stats['median']:.3f}; anchors (Δc > {threshold:g}): "
               f"{100 * delta_stats['anchor_fraction']:.1f}%.", ""]
    if data["selections"]:
        md += ["| selection | tokens selected | share | end tokens selected |", "|---|---|---|---|"]
        for rule, s in data["selections"].items():
            end = (f"{s['end_selected']}/{s['end_tokens']}" if s.get("end_tokens") else "–")
            share = f"{100 * s['selected_fraction']:.1f}%"
            md.append(f"| {rule} | {s['num_selected']}/{s['num_tokens']} | {share} | {end} |")
        md += ["", "\"Selected\" is masked (weight 0) for AR rules and always-masked target for `dllm_targets`. End-of-"
               "sequence / end-of-turn tokens: the paper does not say how it treats them; by default "
               "(`select.always_train_eos`) every AR rule keeps them in the loss.", ""]
    if data["loss_transfer"]:
        m = data["loss_transfer"]["matrix_percent"]
        cols = list(next(iter(m.values())).keys())
        md += ["## Loss-transfer matrix (% loss change; rows: trained subset)", "",
               "| train ↓ / eval → | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        md += [f"| {r} | " + " | ".join(f"{v:+.1f}" for v in m[r].values()) + " |" for r in m]
        md.append("")
    return md


def _samples_section(data: dict) -> list[str]:
    """Two held-out completions per evaluated model."""
    md: list[str] = []
    samples = {k: e.get("samples", [])[:2] for k, e in data["eval"].items()}
    if any(samples.values()):
        md += ["## Sample completions (held-out)", ""]
        for k, ss in samples.items():
            for s in ss:
                md.append(f"- **{LABELS.get(k, k)}** ({'✓' if s['correct'] else '✗'}) `{s['prompt']}` → "
                          f"`{s['completion'][:200]}`")
        md.append("")
    return md


def _provenance_section(prov: dict | None) -> list[str]:
    """What decides the numbers besides the config (:mod:`t3s.runtime` provenance)."""
    md: list[str] = []
    if prov:
        eff, v, b = prov["in_effect"], prov["versions"], prov["blas"]
        md += ["## Reproducibility", "",
               f"Seed {prov['seed']}; {eff['torch_threads']} CPU threads (inter-op {eff['torch_interop_threads']}), "
               f"deterministic algorithms {'on' if eff['deterministic_algorithms'] else 'off'}; "
               + ", ".join(f"{k} {val}" for k, val in v.items() if val)
               + f"; BLAS {b.get('blas_info')} {b.get('mkl') or b.get('openblas') or ''} ({b.get('cpu_capability')})"
               f"; {prov['machine']['cpu']}{', ' + prov['machine']['gpu'] if prov['machine'].get('gpu') else ''}. "
               f"Bit-identical numbers need {prov['reproducible_when']}.", ""]
    return md


def build_report(run_dir: str | Path, cfg: Config, *, description: str | None = None) -> Path:
    """Write ``report/report.md``, ``report/results.json`` and the plots; return the markdown path."""
    run = Path(run_dir)
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = collect(run)
    bn = data["bottleneck"]
    bn_step = bn["step"] if bn else None
    plots = {
        "training_dynamics": plot_training_dynamics(data, out / "training_dynamics.png"),
        "group_dprob": plot_groups(data, out / "group_dprob.png", bn_step),
        "grad_stats": plot_grad_stats(data, out / "grad_stats.png", bn_step),
        "intervention": plot_intervention(data, out / "intervention.png", bn_step),
    }
    plots["delta_c"], delta_stats = plot_delta_c(run, cfg.select.threshold, out / "delta_c.png")
    rows, table = results_table(data, cfg)

    mode = cfg.train.mode
    warnings = share_warnings(data, mode=mode)
    md = ["# T3S run report", "", f"Run directory: `{run}`", ""]
    if description:
        md += [description, ""]
    if warnings:
        md += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    first = next(iter(data["eval"].values()), {})
    samp = first.get("sampling") or {"temperature": 0.0, "num_samples": 1}
    how = ("greedy" if samp["temperature"] == 0
           else f"T={samp['temperature']:g}, {samp['num_samples']} samples per prompt")
    if mode == "dllm":
        how += ", block-diffusion decoding"
    md += [f"## Results (held-out, {how})", "", table, ""]
    if mode == "dllm":
        md += ["dLLM mode: the students are evaluated by block-diffusion decoding (`t3s.dllm.diffusion_generate`: "
               "block by block, the most confident masked position first, in the training's [x_t ‖ x_0] layout); the "
               f"trajectory, θb and Δc come from the AR selector `{cfg.model.selector}`.", ""]
    md += _training_section(data, bn)
    md += _selection_section(data, delta_stats, cfg.select.threshold)
    titles = {"training_dynamics": "Loss and training accuracy", "delta_c": "Δc distribution",
              "group_dprob": "Δ-probability of anchors vs other tokens", "grad_stats": "Anchor/other gradients",
              "intervention": "One-step anchor intervention (paper Fig. 5)"}
    md += ["## Plots", ""]
    md += [f"### {titles[k]}\n\n![{k}]({p.name})\n" for k, p in plots.items() if p is not None]
    md += _samples_section(data)
    prov_path = Path(run_dir) / "provenance.json"
    prov = read_json(prov_path) if prov_path.exists() else None
    md += _provenance_section(prov)
    md += ["## Choices the paper leaves open", "", "The values this run used (from its config):", "",
           *_choices(cfg), ""]
    write_json_atomic(out / "results.json", {"rows": rows, "bottleneck": bn, "delta_c": delta_stats,
                                              "warnings": warnings, "accuracy_settings": data.get("accuracy_settings"),
                                              "mode": mode, "provenance": prov,
                                              "selections": data["selections"],
                                              "loss_transfer": data["loss_transfer"],
                                              "plots": {k: str(p) if p else None for k, p in plots.items()}})
    return write_text_atomic(out / "report.md", "\n".join(md) + "\n")


def format_table(run_dir: str | Path, cfg: Config) -> str:
    """The results table as markdown (for the terminal)."""
    return results_table(collect(Path(run_dir)), cfg)[1]
