"""The shared run context every stage receives: config, tokenizer, records, examples, verifier, held-out set."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

from t3s.answers import get_verifier
from t3s.config import Config
from t3s.data import Record, TokenizedExample, load_records, tokenize_records
from t3s.generate import model_context_length, subset_indices

SELECTION_VARIANTS = ("t3s", "neg_t3s", "static_high_conf", "static_low_conf", "random")
StageBody = Callable[[], "dict | None"]
"""What a :class:`t3s.stages.Stage` calls: a stage's ``run`` bound to the run context (and its variant)."""
TRAINING_KEYS = ("model", "data", "optim", "train")
"""The config sections every training run depends on."""


def gold_checker(verifier: Callable[[str, str], bool]) -> Callable[[str, object], bool]:
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


class RunContext:
    """One run's config and shared inputs, loaded lazily and once; passed to every stage function."""

    def __init__(self, cfg: Config, *, log: Callable[[str], None] = print, progress: bool = True,
                 description: str | None = None):
        self.cfg, self.log, self.progress, self.description = cfg, log, progress, description
        self.run_dir = Path(cfg.run_dir)
        self.cache: dict = {}
        """What stages share within one run: loaded inputs, the derived AR config, θ0's training accuracy."""

    @property
    def tokenizer(self):
        if "tok" not in self.cache:
            from t3s.train import load_tokenizer

            self.cache["tok"] = load_tokenizer(self.cfg.model.tokenizer or self.cfg.model.path,
                                                trust_remote_code=self.cfg.model.trust_remote_code)
        return self.cache["tok"]

    @property
    def tokenizer_dir(self) -> str:
        return self.cfg.model.tokenizer or self.cfg.model.path

    @property
    def records(self) -> list[Record]:
        if "records" not in self.cache:
            d = self.cfg.data
            if not d.train:
                raise ValueError("data.train is not set: give the teacher traces (JSONL / Parquet / HF folder)")
            self.cache["records"] = load_records(d.train, format=d.format, adapter=d.adapter,
                                                  limit=d.max_examples)
        return self.cache["records"]

    @property
    def examples(self) -> list[TokenizedExample]:
        if "examples" not in self.cache:
            d = self.cfg.data
            self.cache["examples"] = tokenize_records(self.records, self.tokenizer, max_tokens=d.max_length,
                                                       truncation=d.truncation)
        return self.cache["examples"]

    def verifier(self):
        return gold_checker(get_verifier(self.cfg.accuracy.verifier))

    @property
    def dllm(self) -> bool:
        return self.cfg.train.mode == "dllm"

    @property
    def ar_cfg(self) -> Config:
        """The config of the AR runs (trajectory, θb, profiling): in dLLM mode the selector replaces the model."""
        if not self.dllm:
            return self.cfg
        if "ar_cfg" not in self.cache:
            c = copy.deepcopy(self.cfg)
            c.model.path = self.cfg.model.selector or ""
            c.model.tokenizer = self.cfg.model.tokenizer or self.cfg.model.path  # shared with the student
            c.train.mode = "ar"
            self.cache["ar_cfg"] = c
        return self.cache["ar_cfg"]

    @property
    def offline_accuracy(self) -> bool:
        """Training accuracy measured on saved checkpoints after the trajectory (vLLM), not inside it."""
        return self.cfg.generation.backend == "vllm" and not self.cfg.accuracy.curve

    def context_length(self, model_path: str) -> int | None:
        from transformers import AutoConfig

        key = f"ctx:{model_path}"
        if key not in self.cache:
            mc = AutoConfig.from_pretrained(model_path, local_files_only=True,
                                            trust_remote_code=self.cfg.model.trust_remote_code)
            self.cache[key] = model_context_length(mc)
        return self.cache[key]

    @property
    def heldout(self) -> tuple[list[Record], list[list[int]]]:
        """The evaluated held-out records and their encoded prompts."""
        if "heldout" not in self.cache:
            from t3s.generate import encode_prompt

            e, d = self.cfg.eval, self.cfg.data
            if not d.heldout:
                raise ValueError("data.heldout is not set: give held-out prompts with gold answers")
            recs = load_eval_records(d.heldout, format=d.format, adapter=d.adapter)
            recs = [recs[i] for i in subset_indices(len(recs), e.num_prompts, seed=0)]
            self.cache["heldout"] = (recs, [encode_prompt(self.tokenizer, r.prompt) for r in recs])
        return self.cache["heldout"]

    def model_dir(self, name: str) -> str:
        return self.cfg.model.path if name == "base" else str(self.run_dir / "variants" / name / "final")

    def trained_variants(self) -> list[str]:
        return [v for v in self.cfg.variants if v != "rrt"]

    def selection_rules(self) -> list[str]:
        if self.dllm:
            return ["dllm_targets"]
        return ["t3s", *[v for v in self.cfg.variants if v in SELECTION_VARIANTS and v != "t3s"]]

    def model_inputs(self, *, ar: bool) -> dict[str, str]:
        """The model, tokenizer and traces a training or profiling run reads (``ar``: the AR selector in dLLM mode)."""
        model = self.ar_cfg.model.path if ar else self.cfg.model.path
        return {"model.path": model, "tokenizer": self.tokenizer_dir, "data.train": self.cfg.data.train}
