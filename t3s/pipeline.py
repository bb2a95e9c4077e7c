"""The whole T3S method as resumable stages over one run directory.

    sft_trajectory -> bottleneck -> profile_base -> profile_bottleneck -> delta -> select
      -> train_<variant> ... -> rrt -> eval_<model> ... -> [loss_transfer] -> report

Each stage writes its outputs atomically and then its marker ``<run_dir>/.stages/<stage>.json``; a re-run
skips every stage whose marker exists, so a killed run loses at most the stage in flight. Under ``torchrun``
every rank runs the pipeline, rank 0 writes the shared files and the markers.

Run directory::

    config.yaml                 the resolved config
    trajectory/                 baseline SFT from θ0: metrics.jsonl (loss, training accuracy), bottleneck/ (θb)
    bottleneck.json             θb's step and accuracy, how it was found
    profile/base, profile/bottleneck, delta/    c_t at θ0 and θb, Δc_t (Parquet + provenance)
    selections/<rule>/          per-token 0/1 weights (t3s, neg_t3s, static_*, random)
    variants/<name>/            metrics.jsonl, summary.json, final/ (a Hugging Face checkpoint)
    eval/<model>.json           held-out accuracy of base and every variant
    diagnostics/                loss_transfer.json (optional)
    report/                     report.md, results.json, *.png
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from t3s import distributed as D
from t3s.answers import get_verifier
from t3s.config import Config, to_dict, to_yaml
from t3s.data import IGNORE_INDEX, Record, TokenizedExample, load_records, tokenize_records
from t3s.generate import subset_indices
from t3s.io import mark_stage_done, read_json, stage_done, write_json_atomic, write_text_atomic

SELECTION_VARIANTS = ("t3s", "neg_t3s", "static_high_conf", "static_low_conf", "random")


# Keys a re-run may change without invalidating finished stages: new variants are new stages.
RESUMABLE_CHANGES = ("variants",)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(run_dir: str | Path, cfg: Config, *, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume ``run_dir`` with a config other than the one its finished stages were made with.

    Reusing those stages would attribute old results to the new settings. Only ``variants`` may change;
    ``ignore`` names dotted keys filled in later by the caller (the demo fills in its asset paths).
    """
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    import yaml

    old = _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    new = _flatten(to_dict(cfg))
    skip = set(RESUMABLE_CHANGES) | set(ignore)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in skip)
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ValueError(
            f"run_dir {run_dir} holds a run made with a different config ({shown}{more}); its finished stages would "
            "not match the new settings. Use another run_dir=..., or delete that folder to start over."
        )


def _gold_checker(verifier: Callable[[str, str], bool]) -> Callable[[str, object], bool]:
    """A gold answer may be a list of accepted answers."""
    def check(completion: str, gold) -> bool:
        golds = gold if isinstance(gold, (list, tuple)) else [gold]
        return any(verifier(completion, str(g)) for g in golds)
    return check


def load_eval_records(path: str, *, format: str = "auto", adapter: str = "auto") -> list[Record]:
    """Held-out records: the training schema, or rows with only a prompt and a gold answer."""
    try:
        return load_records(path, format=format, adapter=adapter)
    except ValueError as e:
        if "response" not in str(e):
            raise
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i, row in enumerate(rows):
        prompt = next((row[k] for k in ("prompt", "question", "problem") if k in row), None)
        answer = next((row[k] for k in ("answer", "gold", "solution") if k in row), None)
        if prompt is None or answer is None:
            raise ValueError(f"{path}:{i + 1}: a held-out record needs a prompt and an answer field")
        out.append(Record(id=str(row.get("id", i)), prompt=str(prompt), response="", answer=answer))
    if not out:
        raise ValueError(f"held-out set {path} is empty")
    return out


class Pipeline:
    """The T3S pipeline for one config. ``run()`` executes (or resumes) every stage in order."""

    def __init__(self, cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True,
                 description: str | None = None):
        self.cfg, self.log, self.progress, self.description = cfg, log, progress, description
        self.run_dir = Path(cfg.run_dir)
        self._cache: dict = {}

    # ---- shared inputs (loaded lazily, once) ----------------------------------------------------------------

    @property
    def tokenizer(self):
        if "tok" not in self._cache:
            from t3s.train import load_tokenizer

            self._cache["tok"] = load_tokenizer(self.cfg.model.tokenizer or self.cfg.model.path)
        return self._cache["tok"]

    @property
    def records(self) -> list[Record]:
        if "records" not in self._cache:
            d = self.cfg.data
            if not d.train:
                raise ValueError("data.train is not set: give the teacher traces (JSONL / Parquet / HF folder)")
            self._cache["records"] = load_records(d.train, format=d.format, adapter=d.adapter,
                                                  limit=d.max_examples)
        return self._cache["records"]

    @property
    def examples(self) -> list[TokenizedExample]:
        if "examples" not in self._cache:
            d = self.cfg.data
            self._cache["examples"] = tokenize_records(self.records, self.tokenizer, max_tokens=d.max_length,
                                                       truncation=d.truncation)
        return self._cache["examples"]

    def _verifier(self):
        return _gold_checker(get_verifier(self.cfg.accuracy.verifier))

    def accuracy_hook(self, *, use_curve: bool):
        """Training accuracy on a fixed subset of training prompts (or the precomputed curve)."""
        from t3s.train import accuracy_hook

        a = self.cfg.accuracy
        curve = None
        if use_curve and a.curve:
            curve = {int(k): float(v) for k, v in read_json(a.curve).items()}
        idx = subset_indices(len(self.examples), a.num_prompts, seed=self.cfg.train.seed)
        prompts = [self.examples[i].input_ids[: self.examples[i].response_start] for i in idx]
        golds = [self.records[i].answer for i in idx]
        if curve is None and any(g is None for g in golds):
            raise ValueError("training accuracy needs a gold answer on every training record (or accuracy.curve)")
        hook = accuracy_hook(prompts, golds, verifier=self._verifier(), max_new_tokens=a.max_new_tokens,
                             batch_size=a.batch_size, curve=curve)
        if curve is not None:
            return hook

        def cached(recipe, step):  # every run starts from θ0: measure its accuracy once
            if step == 0 and "acc0" in self._cache:
                return dict(self._cache["acc0"])
            out = hook(recipe, step)
            if step == 0 and recipe.init_path == self.cfg.model.path:
                self._cache["acc0"] = dict(out)
            return out

        return cached

    def _anchors(self, examples: list[TokenizedExample]) -> list[list[bool]]:
        """Anchor flags aligned with labels, from the T3S selection (weight 0 on a scored token = anchor)."""
        from t3s.select import apply_selection, load_selection

        sel = apply_selection(examples, load_selection(self.run_dir / "selections" / "t3s"))
        return [[label != IGNORE_INDEX and w == 0.0 for label, w in zip(e.labels, e.token_weight, strict=True)]
                for e in sel]

    def _probe(self) -> list[TokenizedExample]:
        idx = subset_indices(len(self.examples), self.cfg.diagnostics.num_examples, seed=self.cfg.train.seed + 1)
        return [self.examples[i] for i in idx]

    # ---- stages -----------------------------------------------------------------------------------------------

    def trained_variants(self) -> list[str]:
        return [v for v in self.cfg.variants if v != "rrt"]

    def stages(self) -> list[tuple[str, Callable[[], dict | None]]]:
        s: list[tuple[str, Callable]] = [
            ("sft_trajectory", self.stage_trajectory),
            ("bottleneck", self.stage_bottleneck),
            ("profile_base", partial(self.stage_profile, "base")),
            ("profile_bottleneck", partial(self.stage_profile, "bottleneck")),
            ("delta", self.stage_delta),
            ("select", self.stage_select),
        ]
        s += [(f"train_{v}", partial(self.stage_train, v)) for v in self.trained_variants()]
        if "rrt" in self.cfg.variants:
            s.append(("rrt", self.stage_rrt))
        s += [(f"eval_{m}", partial(self.stage_eval, m)) for m in ["base", *self.cfg.variants]]
        if self.cfg.diagnostics.loss_transfer:
            s.append(("loss_transfer", self.stage_loss_transfer))
        s.append(("report", self.stage_report))
        return s

    def run(self) -> Path:
        if self.cfg.train.mode != "ar":
            raise ValueError("the pipeline trains and evaluates AR models (train.mode=ar); for block diffusion "
                             "use `t3s train CONFIG train.mode=dllm --selection <dllm_targets selection>`")
        D.init_distributed(None if self.cfg.distributed.backend == "auto" else self.cfg.distributed.backend)
        if D.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._check_config()
        D.barrier()
        for name, fn in self.stages():
            if D.broadcast_object(stage_done(self.run_dir, name)):
                self.log(f"[t3s] {name}: done earlier, skipped")
                continue
            self.log(f"[t3s] {name} ...")
            t0 = time.time()
            info = fn() or {}
            D.barrier()
            if D.is_main():
                mark_stage_done(self.run_dir, name, {"seconds": round(time.time() - t0, 2), **info})
            D.barrier()
        return self.run_dir / "report" / "report.md"

    def _check_config(self) -> None:
        check_resumable(self.run_dir, self.cfg)
        write_text_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))

    def stage_trajectory(self) -> dict:
        """Baseline SFT from θ0 with training accuracy; θb is kept in trajectory/bottleneck."""
        from t3s.train import run_training

        res = run_training(self.cfg, self.examples, self.run_dir / "trajectory",
                           evaluate=[self.accuracy_hook(use_curve=True)], track_bottleneck=True,
                           save_final=False, name="sft trajectory", progress=self.progress)
        return {"steps_run": res.steps_run, "stopped_early": res.stopped_early}

    def stage_bottleneck(self) -> dict:
        summary = read_json(self.run_dir / "trajectory" / "summary.json")
        bn = summary["bottleneck"]
        if not (self.run_dir / "trajectory" / "bottleneck" / "config.json").exists():
            raise RuntimeError("the SFT trajectory left no bottleneck checkpoint in trajectory/bottleneck")
        if D.is_main():
            write_json_atomic(self.run_dir / "bottleneck.json", {**bn, "trajectory_steps": summary["steps_run"],
                                                                   "stopped_early": summary["stopped_early"]})
        self.log(f"[t3s] Imitation Bottleneck at step {bn['step']} (training accuracy {bn['accuracy']}, "
                 f"{bn['method']})")
        return {"step": bn["step"]}

    def stage_profile(self, which: str) -> dict:
        from t3s.profile import profile_confidence

        model = self.cfg.model.path if which == "base" else str(self.run_dir / "trajectory" / "bottleneck")
        profile_confidence(model, self.tokenizer, self.examples, self.run_dir / "profile" / which,
                           max_tokens=self.cfg.data.max_length, dtype=self.cfg.model.dtype,
                           progress=self.progress, packing=self.cfg.train.packing,
                           attn_implementation=self.cfg.model.attn_implementation)
        return {}

    def stage_delta(self) -> dict:
        from t3s.profile import delta_confidence

        info = {}
        if D.is_main():
            store = delta_confidence(self.run_dir / "profile" / "base", self.run_dir / "profile" / "bottleneck",
                                     out=self.run_dir / "delta")
            info = {"anchor_fraction": store.provenance["anchor_fraction"]}
            self.log(f"[t3s] Δc: {100 * info['anchor_fraction']:.1f}% of response tokens are anchors (Δc > 0)")
        return info

    def stage_select(self) -> dict:
        from t3s.select import format_stats, save_selection, select_tokens

        rules = ["t3s", *[v for v in self.cfg.variants if v in SELECTION_VARIANTS and v != "t3s"]]
        s = self.cfg.select
        if D.is_main():
            for rule in rules:
                sel = select_tokens(self.run_dir / "delta", rule=rule, threshold=s.threshold, quantile=s.quantile,
                                    tau=s.tau, seed=s.seed, always_train_eos=s.always_train_eos)
                save_selection(sel, self.run_dir / "selections" / rule)
                self.log(f"[t3s]   {format_stats(sel)}")
        return {"rules": rules}

    def variant_examples(self, variant: str) -> list[TokenizedExample]:
        from t3s.select import apply_selection, load_selection

        if variant == "sft":
            return self.examples
        return apply_selection(self.examples, load_selection(self.run_dir / "selections" / variant))

    def stage_train(self, variant: str) -> dict:
        from t3s.diagnostics import GroupDynamics
        from t3s.train import run_training

        hooks = []
        if self.cfg.accuracy.track_variants:
            hooks.append(self.accuracy_hook(use_curve=False))
        dg = self.cfg.diagnostics
        if dg.delta_prob and variant in ("sft", "t3s"):
            probe = self._probe()
            hooks.append(GroupDynamics(probe, self._anchors(probe), grad_stats=dg.grad_stats and variant == "sft"))
        out = self.run_dir / "variants" / variant
        res = run_training(self.cfg, self.variant_examples(variant), out, evaluate=hooks, save_final=True,
                           name=variant, progress=self.progress)
        return {"steps_run": res.steps_run}

    def stage_rrt(self) -> dict:
        from t3s.rrt import rrt_checkpoint

        if D.is_main():
            rrt_checkpoint(self.cfg.model.path, self.run_dir / "trajectory" / "bottleneck",
                           self.run_dir / "variants" / "sft" / "final", self.run_dir / "variants" / "rrt" / "final",
                           tokenizer_dir=self.cfg.model.tokenizer or self.cfg.model.path)
        return {}

    def model_dir(self, name: str) -> str:
        return self.cfg.model.path if name == "base" else str(self.run_dir / "variants" / name / "final")

    def stage_eval(self, name: str) -> dict:
        """Held-out accuracy of one model (greedy), plus the share of completions in each named style."""
        from t3s.generate import answer_accuracy, encode_prompt
        from t3s.train import load_model

        e, d = self.cfg.eval, self.cfg.data
        if not d.heldout:
            raise ValueError("data.heldout is not set: give held-out prompts with gold answers")
        if "heldout" not in self._cache:
            recs = load_eval_records(d.heldout, format=d.format, adapter=d.adapter)
            recs = [recs[i] for i in subset_indices(len(recs), e.num_prompts, seed=0)]
            self._cache["heldout"] = (recs, [encode_prompt(self.tokenizer, r.prompt) for r in recs])
        recs, prompts = self._cache["heldout"]
        model = load_model(self.model_dir(name), dtype=self.cfg.model.dtype,
                           attn_implementation=self.cfg.model.attn_implementation, device=D.device())
        res = answer_accuracy(model, self.tokenizer, prompts, [r.answer for r in recs], verifier=self._verifier(),
                              max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, progress=self.progress,
                              desc=f"eval {name}")
        styles = {k: float(np.mean([bool(re.search(p, c)) for c in res.completions]))
                  for k, p in e.style_patterns.items()}
        out = {"model": name, "accuracy": res.accuracy, "correct": res.correct, "total": res.total,
               "style_share": styles, "samples": [
                   {"prompt": r.prompt, "gold": r.answer, "completion": c, "correct": ok}
                   for r, c, ok in list(zip(recs, res.completions, res.is_correct, strict=True))[:8]]}
        if D.is_main():
            write_json_atomic(self.run_dir / "eval" / f"{name}.json", out)
        self.log(f"[t3s]   {name}: held-out accuracy {res.accuracy:.3f} ({res.correct}/{res.total})")
        return {"accuracy": res.accuracy}

    def stage_loss_transfer(self) -> dict:
        """Paper Table 6: train on one of four token subsets, measure the loss change on all four."""
        from dataclasses import replace

        from t3s.diagnostics import SubsetLoss, loss_transfer_subsets, transfer_matrix
        from t3s.profile import load_delta
        from t3s.train import run_training

        store = load_delta(self.run_dir / "delta")
        row = {rid: r for r, rid in enumerate(store.ids)}
        base_lp = []
        for e in self.examples:
            dense = np.zeros(len(e.labels), dtype=np.float32)
            r = row[e.id]
            dense[store.column("positions", r)] = store.column("logprob_base", r)
            base_lp.append(dense)
        anchors = self._anchors(self.examples)
        subsets = loss_transfer_subsets(self.examples, anchors, base_lp)
        pidx = subset_indices(len(self.examples), self.cfg.diagnostics.num_examples, seed=self.cfg.train.seed + 1)
        probe = [self.examples[i] for i in pidx]
        probe_subsets = {s: [m[i] for i in pidx] for s, m in subsets.items()}
        steps = self.cfg.diagnostics.loss_transfer_steps or self.cfg.train.steps
        cfg = copy.deepcopy(self.cfg)
        cfg.accuracy.every = steps
        cfg.train.keep_checkpoints = False
        before, after = None, {}
        for s, masks in subsets.items():
            ex = [replace(e, token_weight=[float(m) for m in mask]) for e, mask in zip(self.examples, masks,
                                                                                       strict=True)]
            hook = SubsetLoss(probe, probe_subsets)
            seen: dict[int, dict] = {}
            res = run_training(cfg, ex, self.run_dir / "diagnostics" / "loss_transfer" / s, steps=steps,
                               evaluate=[lambda rc, st, h=hook, seen=seen: seen.setdefault(st, h(rc, st))],
                               save_final=False, name=f"transfer {s}", progress=self.progress)
            before = before or seen[0]
            after[s] = seen[res.steps_run]
        matrix = transfer_matrix(before, after)
        if D.is_main():
            write_json_atomic(self.run_dir / "diagnostics" / "loss_transfer.json",
                              {"steps": steps, "before": before, "after": after, "matrix_percent": matrix})
        return {}

    def stage_report(self) -> dict:
        from t3s.report import build_report

        if D.is_main():
            path = build_report(self.run_dir, self.cfg, description=self.description)
            self.log(f"[t3s] report: {path}")
        return {}


def run_pipeline(cfg: Config, **kw) -> Path:
    """Run (or resume) the whole pipeline; returns the report's path."""
    return Pipeline(cfg, **kw).run()
