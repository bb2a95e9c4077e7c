"""The whole T3S method as resumable stages over one run directory.

    sft_trajectory -> [trajectory_eval] -> bottleneck -> profile_base -> profile_bottleneck -> delta -> select
      -> train_<variant> ... -> rrt -> eval_<model> ... -> [loss_transfer] -> report

Training accuracy (the curve θb is read from) is measured inside the trajectory run with the Hugging Face
backend, or, with ``generation.backend=vllm``, on the checkpoints the trajectory saves at every evaluation step
(``trajectory_eval``: one engine per checkpoint). Either way the settings used (``max_new_tokens``, derived from
the longest training response unless set; sampling; prompts) are in ``trajectory/evaluation.json`` and the
curve is checked before θb is taken from it (:func:`t3s.bottleneck.check_curve`).

``train.mode=dllm`` (dLLM T3S, paper Appendix D): the trajectory, θb and Δc run on the AR selector
``model.selector`` (sharing the student's tokenizer); ``select`` writes the ``dllm_targets`` (Δc < −τ);
``train_sft`` / ``train_t3s`` train the block-diffusion student ``model.path`` with random / union masking;
``eval_*`` decode held-out prompts with :func:`t3s.dllm.diffusion_generate` (block-by-block denoising in the
training layout) and check the answers.

Before the first stage the whole run is checked (paths, model and tokenizer, data, held-out set, verifier,
vocabulary bounds): a mistake fails in seconds, before the run directory exists. Each stage declares the config
keys and input files it depends on and the outputs it writes (:class:`t3s.stages.Stage`); it writes its outputs
atomically, then its marker ``<run_dir>/.stages/<stage>.json`` with those dependencies and the size and sha256
of every output file. A re-run reuses a finished stage only while its dependencies are unchanged and its outputs
intact, re-runs the others (and, through their outputs, whatever reads them) and says why; a killed run loses at
most the stage in flight. ``redo=`` (``t3s run --redo STAGE``) re-runs named stages anyway. Under ``torchrun``
every rank runs the pipeline, rank 0 writes the shared files and the markers.

Run directory::

    .t3s.lock, .t3s.lock.json   held while a run is in progress (t3s.runlock): a second run is refused
    config.yaml                 the resolved config of the latest run
    provenance.json             threads, determinism, seed, library versions, BLAS, CPU / GPU (t3s.runtime)
    trajectory/                 baseline SFT from θ0: metrics.jsonl (loss, training accuracy, truncated shares),
                                evaluation.json (generation settings), bottleneck/ (θb), final/ (θf, full runs)
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
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np

from t3s import distributed as D
from t3s.answers import get_verifier
from t3s.config import Config, check_dllm_pipeline, to_dict, to_yaml
from t3s.data import IGNORE_INDEX, Record, TokenizedExample, load_records, tokenize_records
from t3s.generate import SamplingConfig, derive_max_new_tokens, model_context_length, subset_indices
from t3s.io import atomic_path, read_json, write_json_atomic, write_text_atomic
from t3s.runlock import run_dir_lock
from t3s.stages import Stage, pin_inputs, resolve_redo, run_stages

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
    from t3s.data import read_text_lines

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

            self._cache["tok"] = load_tokenizer(self.cfg.model.tokenizer or self.cfg.model.path,
                                                trust_remote_code=self.cfg.model.trust_remote_code)
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

    @property
    def dllm(self) -> bool:
        return self.cfg.train.mode == "dllm"

    @property
    def ar_cfg(self) -> Config:
        """The config of the AR runs (trajectory, θb, profiling): in dLLM mode the selector replaces the model."""
        if not self.dllm:
            return self.cfg
        if "ar_cfg" not in self._cache:
            c = copy.deepcopy(self.cfg)
            c.model.path = self.cfg.model.selector or ""
            c.model.tokenizer = self.cfg.model.tokenizer or self.cfg.model.path  # shared with the student
            c.train.mode = "ar"
            self._cache["ar_cfg"] = c
        return self._cache["ar_cfg"]

    def _context_length(self, model_path: str) -> int | None:
        from transformers import AutoConfig

        key = f"ctx:{model_path}"
        if key not in self._cache:
            mc = AutoConfig.from_pretrained(model_path, local_files_only=True,
                                            trust_remote_code=self.cfg.model.trust_remote_code)
            self._cache[key] = model_context_length(mc)
        return self._cache[key]

    def _accuracy_subset(self) -> list[int]:
        return subset_indices(len(self.examples), self.cfg.accuracy.num_prompts, seed=self.cfg.train.seed)

    def sampling(self, which: str, prompt_lengths: list[int], model_path: str) -> tuple[SamplingConfig, dict]:
        """The sampling settings of ``accuracy`` or ``eval``, with ``max_new_tokens`` derived when unset."""
        sec = getattr(self.cfg, which)
        if sec.max_new_tokens is None:
            info = derive_max_new_tokens([e.num_response_tokens for e in self.examples], prompt_lengths,
                                         self._context_length(model_path))
        else:
            info = {"max_new_tokens": sec.max_new_tokens, "derived_from": f"{which}.max_new_tokens (set)",
                    "longest_response": max(e.num_response_tokens for e in self.examples)}
        sampling = SamplingConfig(max_new_tokens=int(info["max_new_tokens"]), temperature=sec.temperature,
                                  top_p=sec.top_p, num_samples=sec.num_samples, seed=sec.sampling_seed)
        return sampling, info

    def accuracy_settings(self) -> dict:
        """What the training-accuracy curve is measured with (written to ``trajectory/evaluation.json``)."""
        idx = self._accuracy_subset()
        sampling, info = self.sampling("accuracy", [self.examples[i].response_start for i in idx],
                                       self.ar_cfg.model.path)
        g = self.cfg.generation
        return {"backend": g.backend, "in_training_loop": g.backend == "hf", "sampling": sampling.to_dict(),
                "max_new_tokens": info, "num_prompts": len(idx), "prompt_ids": [self.examples[i].id for i in idx],
                "verifier": self.cfg.accuracy.verifier, "every": self.cfg.accuracy.every,
                "max_truncated_fraction": self.cfg.accuracy.max_truncated_fraction,
                "model": self.ar_cfg.model.path, "trust_remote_code": self.cfg.model.trust_remote_code,
                "tensor_parallel_size": g.tensor_parallel_size if g.backend == "vllm" else None}

    def _curve_check(self, settings: dict):
        """Raise at the first evaluation (θ0) when most completions cannot show an answer."""
        from t3s.bottleneck import check_curve

        a = self.cfg.accuracy

        def check(step: int, metrics: dict) -> None:
            if step == 0:
                row = {"step": 0, **metrics}
                if a.verifier not in ("auto", "exact", "numeric", "math_verify"):
                    row.pop("train_no_answer_fraction", None)  # a custom verifier may read another format
                self._curve_problem(lambda: check_curve(
                    [row], max_truncated_fraction=a.max_truncated_fraction,
                    max_new_tokens=settings["max_new_tokens"]["max_new_tokens"],
                    longest_response=settings["max_new_tokens"].get("longest_response")))
        return check

    def _curve_problem(self, check: Callable[[], None]) -> str | None:
        """Run a curve check; with ``bottleneck.on_bad_curve=warn`` log and return its message instead."""
        from t3s.bottleneck import CurveError

        try:
            check()
        except CurveError as e:
            if self.cfg.bottleneck.on_bad_curve == "error":
                raise
            self.log(f"[t3s] WARNING (bottleneck.on_bad_curve=warn): {e}")
            return str(e)
        return None

    def _curve(self) -> dict[int, float]:
        """``accuracy.curve`` as ``{step: accuracy}``; a malformed file is an error naming it."""
        path = self.cfg.accuracy.curve
        raw = read_json(path)
        try:
            return {int(k): float(v) for k, v in raw.items()}
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"accuracy.curve {path}: expected a JSON object {{step: accuracy}}") from None

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
        idx = self._accuracy_subset()
        prompts = [self.examples[i].input_ids[: self.examples[i].response_start] for i in idx]
        golds = [self.records[i].answer for i in idx]
        if curve is None and any(g is None for g in golds):
            raise ValueError("training accuracy needs a gold answer on every training record (or accuracy.curve)")
        settings = self.accuracy_settings()
        sampling = SamplingConfig(**settings["sampling"])
        hook = accuracy_hook(prompts, golds, verifier=self._verifier(), batch_size=a.batch_size, curve=curve,
                             sampling=sampling, check=self._curve_check(settings) if use_curve else None)
        if curve is not None:
            return hook

        def cached(recipe, step):  # every run starts from θ0: measure its accuracy once
            if step == 0 and "acc0" in self._cache:
                return dict(self._cache["acc0"])
            out = hook(recipe, step)
            if step == 0 and recipe.init_path == self.ar_cfg.model.path:
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
        # the AR runs (trajectory, θb, profiling) use the selector in dLLM mode; the trained variants the student
        ar_base = {"model.path": self.ar_cfg.model.path, "tokenizer": tok, "data.train": c.data.train}
        base = {"model.path": c.model.path, "tokenizer": tok, "data.train": c.data.train}
        training = ("model", "data", "optim", "train")
        traj = {"trajectory/summary.json": r / "trajectory" / "summary.json",
                "trajectory/bottleneck": r / "trajectory" / "bottleneck"}
        rules = self.selection_rules()
        if self.offline_accuracy:
            # trajectory_eval appends to metrics.jsonl and bottleneck copies θb out of checkpoints/ afterwards:
            # the trajectory's own record covers only what no later stage touches
            traj_outputs = ("trajectory/summary.json", "trajectory/evaluation.json", "trajectory/final")
            bn_outputs = ("bottleneck.json", "trajectory/bottleneck")
        else:
            traj_outputs, bn_outputs = ("trajectory",), ("bottleneck.json",)
        s = [Stage("sft_trajectory", self.stage_trajectory,
                   config=(*training, "accuracy", "bottleneck", "generation", "-accuracy.track_variants",
                           "-bottleneck.on_no_shock"),
                   inputs={**ar_base, "accuracy.curve": c.accuracy.curve}, outputs=traj_outputs)]
        if self.offline_accuracy:
            s.append(Stage("trajectory_eval", self.stage_trajectory_eval, config=("accuracy", "generation"),
                           inputs={"trajectory/summary.json": traj["trajectory/summary.json"]},
                           outputs=("trajectory/accuracy",)))
        s += [
            Stage("bottleneck", self.stage_bottleneck, config=("bottleneck", "accuracy.max_truncated_fraction"),
                  inputs={**traj, "trajectory/metrics.jsonl": r / "trajectory" / "metrics.jsonl"},
                  outputs=bn_outputs),
            Stage("profile_base", partial(self.stage_profile, "base"), config=("model.dtype", "data"),
                  inputs=ar_base, outputs=("profile/base",)),
            Stage("profile_bottleneck", partial(self.stage_profile, "bottleneck"), config=("model.dtype", "data"),
                  inputs={"tokenizer": tok, "data.train": c.data.train,
                          "trajectory/bottleneck": traj["trajectory/bottleneck"]}, outputs=("profile/bottleneck",)),
            Stage("delta", self.stage_delta, config=(),
                  inputs={f"profile/{w}": r / "profile" / w for w in ("base", "bottleneck")}, outputs=("delta",)),
            Stage("select", self.stage_select, config=("select", "variants"), inputs={"delta": r / "delta"},
                  outputs=tuple(f"selections/{rule}" for rule in rules)),
        ]
        for v in self.trained_variants():
            with_dynamics = c.diagnostics.delta_prob and v in ("sft", "t3s") and not self.dllm
            inputs = dict(base)
            if self.dllm and v == "t3s":
                inputs["selections/dllm_targets"] = r / "selections" / "dllm_targets"
            elif v in SELECTION_VARIANTS:
                inputs[f"selections/{v}"] = r / "selections" / v
            if with_dynamics:
                inputs["selections/t3s"] = r / "selections" / "t3s"
            acc = ("accuracy", "-accuracy.curve") if c.accuracy.track_variants else ("accuracy.track_variants",)
            diag = ("diagnostics.delta_prob", "diagnostics.grad_stats", "diagnostics.num_examples") \
                if with_dynamics else ("diagnostics.delta_prob",)
            if v == "sft":
                diag = (*diag, "diagnostics.anchor_intervention", "diagnostics.intervention_lr")
            s.append(Stage(f"train_{v}", partial(self.stage_train, v),
                           config=(*training, *acc, *diag, *(("dllm",) if self.dllm else ())),
                           inputs=inputs, outputs=(f"variants/{v}",)))
        if "rrt" in c.variants:  # θf: the trajectory's own final checkpoint, or the SFT variant's (rrt_final_source)
            s.append(Stage("rrt", self.stage_rrt, config=(),
                           inputs={"model.path": c.model.path, "tokenizer": tok,
                                   "trajectory/bottleneck": traj["trajectory/bottleneck"],
                                   "trajectory/final": r / "trajectory" / "final",
                                   "variants/sft/final": r / "variants" / "sft" / "final"},
                           outputs=("variants/rrt",)))
        for m in ["base", *c.variants]:
            s.append(Stage(f"eval_{m}", partial(self.stage_eval, m),
                           config=("eval", "accuracy.verifier", "model.dtype", "model.attn_implementation",
                                   "model.trust_remote_code", "generation", "data.format", "data.adapter",
                                   *(("dllm",) if self.dllm else ())),
                           inputs={"model": self.model_dir(m), "tokenizer": tok, "data.heldout": c.data.heldout,
                                   "data.train": c.data.train},  # max_new_tokens may derive from the traces
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

    @property
    def offline_accuracy(self) -> bool:
        """Training accuracy measured on saved checkpoints after the trajectory (vLLM), not inside it."""
        return self.cfg.generation.backend == "vllm" and not self.cfg.accuracy.curve

    def selection_rules(self) -> list[str]:
        if self.dllm:
            return ["dllm_targets"]
        return ["t3s", *[v for v in self.cfg.variants if v in SELECTION_VARIANTS and v != "t3s"]]

    def run(self, *, redo: Iterable[str] = ()) -> Path:
        from t3s.runtime import apply_runtime, provenance, runtime_state

        apply_runtime(self.cfg.runtime, self.cfg.train.seed)
        if self.dllm and D.launched_distributed():
            raise ValueError("train.mode=dllm: the block-diffusion trainer runs on a single process; launch "
                             "`t3s run` without torchrun")
        rt = self.cfg.runtime
        D.init_distributed(None if self.cfg.distributed.backend == "auto" else self.cfg.distributed.backend,
                           timeout_s=rt.dist_timeout_s)
        trust_stat = self.cfg.runtime.verify == "stat"
        # digested before validation reads them: a stage that finds one changed since then fails, naming it;
        # then one run at a time on the run directory (rank 0 holds the lock)
        pins = pin_inputs(self.run_dir, self.external_inputs(), trust_stat=trust_stat) if D.is_main() else None
        self.validate()  # on every rank (all fail alike), before anything is written
        stages = self.stages()
        resolve_redo(redo, stages)  # an unknown --redo name fails before the run directory exists
        with D.naming_lost_ranks(rt.dist_timeout_s), run_dir_lock(self.run_dir, log=self.log):
            if D.is_main():
                write_text_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))
                write_json_atomic(self.run_dir / "provenance.json",
                                  provenance(self.cfg.runtime, self.cfg.train.seed))
            D.barrier()
            run_stages(self.run_dir, to_dict(self.cfg), stages, redo=redo, trust_stat=trust_stat, log=self.log,
                       record={"runtime": runtime_state()}, pins=pins)
        return self.run_dir / "report" / "report.md"

    def external_inputs(self) -> dict[str, str]:
        """The files and folders outside the run directory that stages read, by config key."""
        c = self.cfg
        return {"model.path": c.model.path, "model.selector": c.model.selector or "",
                "model.tokenizer": c.model.tokenizer or "", "data.train": c.data.train,
                "data.heldout": c.data.heldout, "accuracy.curve": c.accuracy.curve or ""}

    # ---- validation before the first stage --------------------------------------------------------------------

    def validate(self) -> None:
        """Check everything a later stage needs, so a mistake costs seconds, not a trained stage."""
        from t3s.preflight import check_file, check_model_dir, check_tokenizer_dir, check_verifier, check_vocabulary

        c = self.cfg
        if self.dllm:
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
            self._curve()
        check_model_dir("model.path", c.model.path)
        if self.dllm:
            from t3s.preflight import check_dllm

            check_model_dir("model.selector", c.model.selector)
            check_dllm(c, self.tokenizer)
        check_tokenizer_dir("model.tokenizer" if c.model.tokenizer else "model.path", c.model.tokenizer or c.model.path)
        check_verifier("accuracy.verifier", c.accuracy.verifier)
        examples = self.examples  # loads and tokenizes the data: data errors surface now
        if not c.accuracy.curve and any(self.records[i].answer is None for i in self._accuracy_subset()):
            raise ValueError("training accuracy needs a gold answer on every training record (or accuracy.curve)")
        check_vocabulary(c.model.path, self.tokenizer, (e.input_ids for e in examples), what="data.train")
        _, prompts = self.heldout
        check_vocabulary(c.model.path, self.tokenizer, prompts, what="data.heldout")

    def stage_trajectory(self) -> dict:
        """Baseline SFT from θ0 (the AR selector in dLLM mode) with training accuracy; θb, θf in trajectory/."""
        from t3s.config import trajectory_stops_early
        from t3s.train import run_training

        cfg, out = self.ar_cfg, self.run_dir / "trajectory"
        if self.dllm:
            self._check_selector()
        settings = self.accuracy_settings()
        if D.is_main():
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "evaluation.json", settings)
        self.log(f"[t3s] training accuracy: {settings['num_prompts']} prompts, max_new_tokens "
                 f"{settings['max_new_tokens']['max_new_tokens']} ({settings['max_new_tokens']['derived_from']}), "
                 f"{'greedy' if settings['sampling']['temperature'] == 0 else 'sampled'}, backend "
                 f"{settings['backend']}")
        if self.offline_accuracy:  # save every evaluated checkpoint; trajectory_eval measures them
            tcfg = copy.deepcopy(cfg)
            tcfg.train.keep_checkpoints = True
            res = run_training(tcfg, self.examples, out, evaluate=[], track_bottleneck=cfg.bottleneck.method == "fixed",
                               save_final=True, name="sft trajectory", progress=self.progress)
        else:
            res = run_training(cfg, self.examples, out, evaluate=[self.accuracy_hook(use_curve=True)],
                               track_bottleneck=True, save_final=not trajectory_stops_early(cfg),
                               name="sft trajectory", progress=self.progress)
        return {"steps_run": res.steps_run, "stopped_early": res.stopped_early}

    def _check_selector(self) -> None:
        """dLLM mode: the AR selector must share the student's tokenizer (its ids index the same vocabulary)."""
        from transformers import AutoConfig

        sel = self.cfg.model.selector
        tok = self.tokenizer
        if Path(sel, "tokenizer_config.json").exists():
            from t3s.train import load_tokenizer

            other = load_tokenizer(sel, trust_remote_code=self.cfg.model.trust_remote_code)
            if other.get_vocab() != tok.get_vocab():
                raise ValueError(f"model.selector {sel} has a different tokenizer from the dLLM student; the paper's "
                                 "selector shares the tokenizer (Δc positions must index the same tokens)")
        vocab = getattr(AutoConfig.from_pretrained(sel, local_files_only=True,
                                                   trust_remote_code=self.cfg.model.trust_remote_code),
                        "vocab_size", None)
        if vocab is not None and vocab < len(tok):
            raise ValueError(f"model.selector {sel} has vocab_size {vocab} < the tokenizer's {len(tok)} tokens")

    def _trajectory_checkpoints(self) -> dict[int, Path]:
        ck = self.run_dir / "trajectory" / "checkpoints"
        found = {int(p.name.split("_")[1]): p for p in ck.glob("step_*") if (p / "config.json").exists()}
        return dict(sorted(found.items()))

    def stage_trajectory_eval(self) -> dict:
        """vLLM: training accuracy of every saved trajectory checkpoint, one engine per checkpoint (resumable)."""
        from t3s.generate import VLLMBackend, answer_accuracy

        if D.is_distributed():
            raise RuntimeError("trajectory_eval starts vLLM engines (tensor-parallel over generation."
                               "tensor_parallel_size GPUs) and must run in a single process: re-run `t3s run CONFIG` "
                               "without torchrun; finished stages are skipped")
        settings = read_json(self.run_dir / "trajectory" / "evaluation.json")
        sampling = SamplingConfig(**settings["sampling"])
        idx = self._accuracy_subset()
        prompts = [self.examples[i].input_ids[: self.examples[i].response_start] for i in idx]
        golds = [self.records[i].answer for i in idx]
        g, check = self.cfg.generation, self._curve_check(settings)
        done_dir = self.run_dir / "trajectory" / "accuracy"
        checkpoints = {0: Path(self.ar_cfg.model.path), **self._trajectory_checkpoints()}
        rows = []
        for step, path in checkpoints.items():
            out = done_dir / f"step_{step:06d}.json"
            if not out.exists():
                with VLLMBackend(str(path), tokenizer=self.cfg.model.tokenizer or self.cfg.model.path,
                                 tensor_parallel_size=g.tensor_parallel_size, dtype=g.dtype,
                                 trust_remote_code=self.cfg.model.trust_remote_code,
                                 gpu_memory_utilization=g.gpu_memory_utilization, max_model_len=g.max_model_len,
                                 engine_kwargs=g.engine_kwargs) as backend:
                    res = answer_accuracy(backend, self.tokenizer, prompts, golds, verifier=self._verifier(),
                                          sampling=sampling)
                write_json_atomic(out, {"step": step, **res.metrics("train")})
            row = read_json(out)
            check(step, {k: v for k, v in row.items() if k != "step"})
            rows.append(row)
            self.log(f"[t3s]   step {step}: training accuracy {row['train_accuracy']:.3f}")
        with (self.run_dir / "trajectory" / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return {"checkpoints": len(rows)}

    def stage_bottleneck(self) -> dict:
        """θb from the curve (checked first: a flat or truncated curve is an error, never a silent θb)."""
        import shutil

        from t3s.bottleneck import check_curve, describe, find_bottleneck
        from t3s.report import read_metrics

        cfg, traj = self.ar_cfg, self.run_dir / "trajectory"
        summary = read_json(traj / "summary.json")
        settings = read_json(traj / "evaluation.json") if (traj / "evaluation.json").exists() else {}
        rows = [r for r in read_metrics(traj / "metrics.jsonl") if "train_accuracy" in r]
        b, problem = cfg.bottleneck, None
        if b.method != "fixed":
            a = cfg.accuracy
            if a.verifier not in ("auto", "exact", "numeric", "math_verify"):
                rows = [{k: v for k, v in r.items() if k != "train_no_answer_fraction"} for r in rows]
            mnt = settings.get("max_new_tokens", {})
            problem = self._curve_problem(lambda: check_curve(
                rows, max_truncated_fraction=a.max_truncated_fraction,
                max_new_tokens=mnt.get("max_new_tokens"), longest_response=mnt.get("longest_response")))
        if self.offline_accuracy:
            curve = {int(r["step"]): float(r["train_accuracy"]) for r in rows}
            bn = find_bottleneck(curve, method=b.method, step=b.step, patience=b.patience, min_delta=b.min_delta,
                                 min_step=b.min_step).to_dict()
            if b.method != "fixed" and D.is_main():
                src = self._trajectory_checkpoints().get(bn["step"])
                if src is None:
                    raise RuntimeError(f"no saved trajectory checkpoint for the bottleneck step {bn['step']}")
                with atomic_path(traj / "bottleneck", is_dir=True) as tmp:
                    shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            bn = summary["bottleneck"]
        bn["min_step"] = b.min_step
        shock = self._shock(rows, settings) if b.method != "fixed" else None
        if not (traj / "bottleneck" / "config.json").exists():
            raise RuntimeError("the SFT trajectory left no bottleneck checkpoint in trajectory/bottleneck")
        info = {**bn, "description": describe(bn), "trajectory_steps": summary["steps_run"],
                "stopped_early": summary["stopped_early"], "evaluated_steps": [int(r["step"]) for r in rows],
                "curve_problem": problem, "shock": shock,
                "generation": {k: settings.get(k) for k in ("backend", "sampling", "max_new_tokens", "num_prompts")}}
        if D.is_main():
            write_json_atomic(self.run_dir / "bottleneck.json", info)
            if self.offline_accuracy and not self.cfg.train.keep_checkpoints:
                shutil.rmtree(traj / "checkpoints", ignore_errors=True)  # θb and θf are kept
        acc = bn["accuracy"]
        self.log(f"[t3s] Imitation Bottleneck at step {bn['step']} (training accuracy "
                 f"{'n/a' if acc is None else format(acc, '.3f')}; {describe(bn)})")
        return {"step": bn["step"]}

    def _shock(self, rows: list[dict], settings: dict) -> dict | None:
        """:func:`t3s.bottleneck.shock_check` on the trajectory; no shock stops here unless on_no_shock=proceed."""
        from t3s.bottleneck import NoShockError, shock_check

        sampling = settings.get("sampling") or {}
        trials = (settings["num_prompts"] * sampling.get("num_samples", 1)) if settings.get("num_prompts") else None
        shock = shock_check({int(r["step"]): float(r["train_accuracy"]) for r in rows}, num_trials=trials)
        if shock is None or shock["message"] is None:
            return shock
        if not shock["shock"] and self.cfg.bottleneck.on_no_shock == "error":
            raise NoShockError(f"{shock['message']}. Stopped before profiling; bottleneck.on_no_shock=proceed runs "
                               "anyway")
        self.log(f"[t3s] WARNING: {shock['message']}")
        return shock

    def stage_profile(self, which: str) -> dict:
        from t3s.profile import profile_confidence

        model = self.ar_cfg.model.path if which == "base" else str(self.run_dir / "trajectory" / "bottleneck")
        if self.cfg.model.trust_remote_code:  # profile's own loader never runs remote code: load it here
            from t3s.train import load_model

            model = load_model(model, dtype=self.cfg.model.dtype, device=D.device(), trust_remote_code=True)
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
                                    tau=s.tau, seed=s.seed, end_token_ids=s.end_token_ids, ranking=s.ranking,
                                    always_train_eos=s.always_train_eos and rule != "dllm_targets")
                save_selection(sel, self.run_dir / "selections" / rule)
                self.log(f"[t3s]   {format_stats(sel)}")
        return {"rules": rules}

    def variant_examples(self, variant: str) -> list[TokenizedExample]:
        from t3s.select import apply_selection, load_selection

        if variant == "sft":
            return self.examples
        rule = "dllm_targets" if self.dllm else variant
        return apply_selection(self.examples, load_selection(self.run_dir / "selections" / rule))

    def stage_train(self, variant: str) -> dict:
        from t3s.diagnostics import AnchorIntervention, GroupDynamics
        from t3s.train import run_training

        if self.dllm:
            return self.stage_train_dllm(variant)
        hooks = []
        if self.cfg.accuracy.track_variants:
            hooks.append(self.accuracy_hook(use_curve=False))
        dg = self.cfg.diagnostics
        if dg.delta_prob and variant in ("sft", "t3s"):
            probe = self._probe()
            hooks.append(GroupDynamics(probe, self._anchors(probe), grad_stats=dg.grad_stats and variant == "sft"))
        if dg.anchor_intervention and variant == "sft":
            probe = self._probe()
            hooks.append(AnchorIntervention(probe, self._anchors(probe), lr=dg.intervention_lr or self.cfg.optim.lr))
        out = self.run_dir / "variants" / variant
        res = run_training(self.cfg, self.variant_examples(variant), out, evaluate=hooks, save_final=True,
                           name=variant, progress=self.progress)
        return {"steps_run": res.steps_run}

    def stage_train_dllm(self, variant: str) -> dict:
        """Block-diffusion SFT (random masks) or dLLM T3S (union mask with the Δc < −τ targets)."""
        from dataclasses import asdict

        from t3s.dllm import resolve_dllm_config
        from t3s.train import run_dllm_training

        out = self.run_dir / "variants" / variant
        examples = self.variant_examples(variant)
        final = run_dllm_training(self.cfg, examples, out)
        resolved = asdict(resolve_dllm_config(self.cfg.dllm, self.tokenizer))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        write_json_atomic(out / "summary.json", {
            "mode": "dllm", "variant": variant, "steps_run": len(rows), "final_dir": str(final), "dllm": resolved,
            "targets": variant == "t3s", "trust_remote_code": self.cfg.model.trust_remote_code,
            "selector": self.cfg.model.selector})
        return {"steps_run": len(rows)}

    def rrt_final_source(self) -> Path:
        """θf for RRT: the trajectory's own final checkpoint when it ran to the end, else the SFT variant's."""
        summary = read_json(self.run_dir / "trajectory" / "summary.json")
        own = self.run_dir / "trajectory" / "final"
        if not summary.get("stopped_early") and (own / "config.json").exists():
            return own
        sft = self.run_dir / "variants" / "sft" / "final"
        if not (sft / "config.json").exists():
            raise RuntimeError("RRT needs θf: the trajectory stopped early and no SFT variant was trained")
        return sft

    def stage_rrt(self) -> dict:
        from t3s.rrt import rrt_checkpoint

        final = self.rrt_final_source()
        if D.is_main():
            rrt_checkpoint(self.cfg.model.path, self.run_dir / "trajectory" / "bottleneck", final,
                           self.run_dir / "variants" / "rrt" / "final",
                           tokenizer_dir=self.cfg.model.tokenizer or self.cfg.model.path,
                           trust_remote_code=self.cfg.model.trust_remote_code)
        return {"theta_f": str(final)}

    def model_dir(self, name: str) -> str:
        return self.cfg.model.path if name == "base" else str(self.run_dir / "variants" / name / "final")

    def _eval_backend(self, name: str):
        """The generation backend for one evaluated model (HF / vLLM; diffusion decoding in dLLM mode)."""
        from t3s.generate import HFBackend, VLLMBackend, stop_token_ids
        from t3s.train import load_model

        path, g, trust = self.model_dir(name), self.cfg.generation, self.cfg.model.trust_remote_code
        if self.dllm:
            from t3s.dllm import DiffusionBackend, resolve_dllm_config

            model = load_model(path, dtype=self.cfg.model.dtype, attn_implementation=self.cfg.model.attn_implementation,
                               device=D.device(), trust_remote_code=trust)
            return DiffusionBackend(model, self.tokenizer, resolve_dllm_config(self.cfg.dllm, self.tokenizer),
                                    eos_token_ids=stop_token_ids(model, self.tokenizer), progress=self.progress,
                                    desc=f"eval {name}")
        if g.backend == "vllm":
            if D.is_distributed():
                raise RuntimeError("eval with generation.backend=vllm runs in a single process: re-run `t3s run "
                                   "CONFIG` without torchrun; finished stages are skipped")
            return VLLMBackend(path, tokenizer=self.cfg.model.tokenizer or self.cfg.model.path,
                               tensor_parallel_size=g.tensor_parallel_size, dtype=g.dtype, trust_remote_code=trust,
                               gpu_memory_utilization=g.gpu_memory_utilization, max_model_len=g.max_model_len,
                               engine_kwargs=g.engine_kwargs)
        model = load_model(path, dtype=self.cfg.model.dtype, attn_implementation=self.cfg.model.attn_implementation,
                           device=D.device(), trust_remote_code=trust)
        return HFBackend(model, self.tokenizer, batch_size=self.cfg.eval.batch_size, progress=self.progress,
                         desc=f"eval {name}")

    def stage_eval(self, name: str) -> dict:
        """Held-out accuracy of one model, plus the share of completions in each named style."""
        from t3s.generate import answer_accuracy

        e = self.cfg.eval
        recs, prompts = self.heldout
        sampling, info = self.sampling("eval", [len(p) for p in prompts], self.model_dir(name))
        with self._eval_backend(name) as backend:
            res = answer_accuracy(backend, self.tokenizer, prompts, [r.answer for r in recs],
                                  verifier=self._verifier(), sampling=sampling, desc=f"eval {name}")
        styles = {k: float(np.mean([bool(re.search(p, c)) for c in res.completions]))
                  for k, p in e.style_patterns.items()}
        n = sampling.num_samples
        out = {"model": name, "accuracy": res.accuracy, "correct": res.correct, "total": res.total,
               "truncated_fraction": res.truncated_fraction, "no_answer_fraction": res.no_answer_fraction,
               "backend": backend.name, "sampling": sampling.to_dict(), "max_new_tokens": info,
               "trust_remote_code": self.cfg.model.trust_remote_code,
               "decoding": "block-diffusion denoising (t3s.dllm.diffusion_generate)" if self.dllm else "autoregressive",
               "style_share": styles, "samples": [
                   {"prompt": r.prompt, "gold": r.answer, "completion": res.completions[i * n],
                    "correct": res.is_correct[i * n]} for i, r in enumerate(recs[:8])]}
        if D.is_main():
            write_json_atomic(self.run_dir / "eval" / f"{name}.json", out)
        self.log(f"[t3s]   {name}: held-out accuracy {res.accuracy:.3f} ({res.correct}/{res.total}"
                 f"{f', {100 * res.truncated_fraction:.0f}% truncated' if res.truncated else ''})")
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
