"""The whole T3S method as resumable stages over one run directory.

    sft_trajectory -> bottleneck -> profile_base -> profile_bottleneck -> delta -> select
      -> train_<variant> ... -> rrt -> eval_<model> ... -> [loss_transfer] -> report

Before the first stage the whole run is checked (paths, model and tokenizer, data, held-out set, verifier,
vocabulary bounds): a mistake fails in seconds, before the run directory exists. Each stage declares the config
keys and input files it depends on and the outputs it writes (:class:`t3s.stages.Stage`); it writes its outputs
atomically, then its marker ``<run_dir>/.stages/<stage>.json`` with those dependencies and the size and sha256
of every output file. A re-run reuses a finished stage only while its dependencies are unchanged and its outputs
intact, re-runs the others (and, through their outputs, whatever reads them) and says why; a killed run loses at
most the stage in flight. ``redo=`` (``t3s run --redo STAGE``) re-runs named stages anyway. Under ``torchrun``
every rank runs the pipeline, rank 0 writes the shared files and the markers.

Run directory::

    config.yaml                 the resolved config of the latest run
    provenance.json             threads, determinism, seed, library versions, BLAS, CPU / GPU (t3s.runtime)
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
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np

from t3s import distributed as D
from t3s.answers import get_verifier
from t3s.config import Config, to_dict, to_yaml
from t3s.data import IGNORE_INDEX, Record, TokenizedExample, load_records, tokenize_records
from t3s.generate import subset_indices
from t3s.io import read_json, write_json_atomic, write_text_atomic
from t3s.stages import Stage, resolve_redo, run_stages

SELECTION_VARIANTS = ("t3s", "neg_t3s", "static_high_conf", "static_low_conf", "random")


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
    from t3s.preflight import read_text_lines

    rows = []
    for line_no, line in read_text_lines(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
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

    def _curve(self) -> dict[int, float]:
        """``accuracy.curve`` as ``{step: accuracy}``; a malformed file is an error naming it."""
        path = self.cfg.accuracy.curve
        raw = read_json(path)
        try:
            return {int(k): float(v) for k, v in raw.items()}
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"accuracy.curve {path}: expected a JSON object {{step: accuracy}}") from None

    def _accuracy_indices(self) -> list[int]:
        return subset_indices(len(self.examples), self.cfg.accuracy.num_prompts, seed=self.cfg.train.seed)

    @property
    def heldout(self) -> tuple[list[Record], list[list[int]]]:
        """The evaluated held-out records and their encoded prompts."""
        if "heldout" not in self._cache:
            from t3s.generate import encode_prompt

            e, d = self.cfg.eval, self.cfg.data
            if not d.heldout:
                raise ValueError("data.heldout is not set: give held-out prompts with gold answers")
            recs = load_eval_records(d.heldout, format=d.format, adapter=d.adapter)
            recs = [recs[i] for i in subset_indices(len(recs), e.num_prompts, seed=0)]
            self._cache["heldout"] = (recs, [encode_prompt(self.tokenizer, r.prompt) for r in recs])
        return self._cache["heldout"]

    def accuracy_hook(self, *, use_curve: bool):
        """Training accuracy on a fixed subset of training prompts (or the precomputed curve)."""
        from t3s.train import accuracy_hook

        a = self.cfg.accuracy
        curve = self._curve() if use_curve and a.curve else None
        idx = self._accuracy_indices()
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

    def stages(self) -> list[Stage]:
        """Every stage in order, with what it depends on and what it writes (see :mod:`t3s.stages`)."""
        c, r = self.cfg, self.run_dir
        tok = c.model.tokenizer or c.model.path
        base = {"model.path": c.model.path, "tokenizer": tok, "data.train": c.data.train}
        training = ("model", "data", "optim", "train")
        traj = {"trajectory/summary.json": r / "trajectory" / "summary.json",
                "trajectory/bottleneck": r / "trajectory" / "bottleneck"}
        rules = self.selection_rules()
        s = [
            Stage("sft_trajectory", self.stage_trajectory,
                  config=(*training, "accuracy", "bottleneck", "-accuracy.track_variants"),
                  inputs={**base, "accuracy.curve": c.accuracy.curve}, outputs=("trajectory",)),
            Stage("bottleneck", self.stage_bottleneck, config=(), inputs=traj, outputs=("bottleneck.json",)),
            Stage("profile_base", partial(self.stage_profile, "base"), config=("model.dtype", "data"),
                  inputs=base, outputs=("profile/base",)),
            Stage("profile_bottleneck", partial(self.stage_profile, "bottleneck"), config=("model.dtype", "data"),
                  inputs={"tokenizer": tok, "data.train": c.data.train,
                          "trajectory/bottleneck": traj["trajectory/bottleneck"]}, outputs=("profile/bottleneck",)),
            Stage("delta", self.stage_delta, config=(),
                  inputs={f"profile/{w}": r / "profile" / w for w in ("base", "bottleneck")}, outputs=("delta",)),
            Stage("select", self.stage_select, config=("select", "variants"), inputs={"delta": r / "delta"},
                  outputs=tuple(f"selections/{rule}" for rule in rules)),
        ]
        for v in self.trained_variants():
            with_dynamics = c.diagnostics.delta_prob and v in ("sft", "t3s")
            inputs = dict(base)
            if v in SELECTION_VARIANTS:
                inputs[f"selections/{v}"] = r / "selections" / v
            if with_dynamics:
                inputs["selections/t3s"] = r / "selections" / "t3s"
            acc = ("accuracy", "-accuracy.curve") if c.accuracy.track_variants else ("accuracy.track_variants",)
            diag = ("diagnostics.delta_prob", "diagnostics.grad_stats", "diagnostics.num_examples") \
                if with_dynamics else ("diagnostics.delta_prob",)
            s.append(Stage(f"train_{v}", partial(self.stage_train, v), config=(*training, *acc, *diag),
                           inputs=inputs, outputs=(f"variants/{v}",)))
        if "rrt" in c.variants:
            s.append(Stage("rrt", self.stage_rrt, config=(),
                           inputs={"model.path": c.model.path, "tokenizer": tok,
                                   "trajectory/bottleneck": traj["trajectory/bottleneck"],
                                   "variants/sft/final": r / "variants" / "sft" / "final"},
                           outputs=("variants/rrt",)))
        for m in ["base", *c.variants]:
            s.append(Stage(f"eval_{m}", partial(self.stage_eval, m),
                           config=("eval", "accuracy.verifier", "model.dtype", "model.attn_implementation",
                                   "data.format", "data.adapter"),
                           inputs={"model": self.model_dir(m), "tokenizer": tok, "data.heldout": c.data.heldout},
                           outputs=(f"eval/{m}.json",)))
        if c.diagnostics.loss_transfer:
            s.append(Stage("loss_transfer", self.stage_loss_transfer,
                           config=(*training, "accuracy", "diagnostics", "-accuracy.curve"),
                           inputs={**base, "delta": r / "delta", "selections/t3s": r / "selections" / "t3s"},
                           outputs=("diagnostics/loss_transfer.json", "diagnostics/loss_transfer")))
        # The report reads every earlier output and the whole config; rebuilding it is cheap.
        report_inputs = {f"{st.name}:{out}": r / out for st in s for out in st.outputs}
        s.append(Stage("report", self.stage_report, config=("",), inputs=report_inputs, outputs=("report",)))
        return s

    def selection_rules(self) -> list[str]:
        return ["t3s", *[v for v in self.cfg.variants if v in SELECTION_VARIANTS and v != "t3s"]]

    def run(self, *, redo: Iterable[str] = ()) -> Path:
        from t3s.runtime import apply_runtime, provenance, runtime_state

        apply_runtime(self.cfg.runtime, self.cfg.train.seed)
        D.init_distributed(None if self.cfg.distributed.backend == "auto" else self.cfg.distributed.backend)
        self.validate()  # on every rank (all fail alike), before anything is written
        stages = self.stages()
        resolve_redo(redo, stages)  # an unknown --redo name fails before the run directory exists
        if D.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))
            write_json_atomic(self.run_dir / "provenance.json", provenance(self.cfg.runtime, self.cfg.train.seed))
        D.barrier()
        run_stages(self.run_dir, to_dict(self.cfg), stages, redo=redo, trust_stat=self.cfg.runtime.verify == "stat",
                   log=self.log, record={"runtime": runtime_state()})
        return self.run_dir / "report" / "report.md"

    # ---- validation before the first stage --------------------------------------------------------------------

    def validate(self) -> None:
        """Check everything a later stage needs, so a mistake costs seconds, not a trained stage."""
        from t3s.preflight import (check_file, check_model_dir, check_tokenizer_dir, check_verifier,
                                   check_vocabulary)

        c = self.cfg
        if c.train.mode != "ar":
            raise ValueError("the pipeline trains and evaluates AR models (train.mode=ar); for block diffusion "
                             "use `t3s train CONFIG train.mode=dllm --selection <dllm_targets selection>`")
        if not c.data.train:
            raise ValueError("data.train is not set: give the teacher traces (JSONL / Parquet / HF folder)")
        check_file("data.train", c.data.train)
        if not c.data.heldout:
            raise ValueError("data.heldout is not set: give held-out prompts with gold answers (the eval stages "
                             "need them; set it before training starts)")
        check_file("data.heldout", c.data.heldout)
        if c.accuracy.curve:
            check_file("accuracy.curve", c.accuracy.curve)
            self._curve()
        check_model_dir("model.path", c.model.path)
        check_tokenizer_dir("model.tokenizer" if c.model.tokenizer else "model.path", c.model.tokenizer or c.model.path)
        check_verifier("accuracy.verifier", c.accuracy.verifier)
        examples = self.examples  # loads and tokenizes the data: data errors surface now
        if not c.accuracy.curve and any(self.records[i].answer is None for i in self._accuracy_indices()):
            raise ValueError("training accuracy needs a gold answer on every training record (or accuracy.curve)")
        check_vocabulary(c.model.path, self.tokenizer, (e.input_ids for e in examples), what="data.train")
        _, prompts = self.heldout
        check_vocabulary(c.model.path, self.tokenizer, prompts, what="data.heldout")

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

        rules = self.selection_rules()
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
        from t3s.generate import answer_accuracy
        from t3s.train import load_model

        e = self.cfg.eval
        recs, prompts = self.heldout
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


def run_pipeline(cfg: Config, *, redo: Iterable[str] = (), **kw) -> Path:
    """Run (or resume) the whole pipeline; returns the report's path. ``redo``: stages to re-run anyway."""
    return Pipeline(cfg, **kw).run(redo=redo)
