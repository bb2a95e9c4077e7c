"""The built-in demo: a tiny Hugging Face causal LM on a synthetic arithmetic task, offline on CPU.

``prepare_demo(run_dir)`` builds everything the pipeline needs before its first stage:

1. the task's data (teacher-B training traces and a held-out split, JSONL in the canonical form
   ``{id, prompt, response, answer}``),
2. a word-level tokenizer with a chat template (``save_pretrained``),
3. the base student θ0: a tiny ``LlamaForCausalLM`` built from a config and pretrained on teacher A's terse
   style until it solves the task (``save_pretrained``, written atomically; skipped when already there).

The pipeline then continually distills θ0 on teacher B's traces (``t3s/configs/demo.yaml``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t3s.demo.model import TinyModelSpec, build_model
from t3s.demo.pretrain import PretrainSpec, answer_accuracy, pretrain
from t3s.demo.task import FAMILIES, TaskSpec, family_of, make_datasets
from t3s.demo.tokenizer import build_tokenizer
from t3s.io import atomic_path, read_json, write_json_atomic, write_text_atomic

__all__ = ["DemoAssets", "PretrainSpec", "TaskSpec", "TinyModelSpec", "prepare_demo", "DEMO_CONFIG_PATH"]

PRETRAIN_VERSION = 4  # bump when the pretraining stream changes, so a cached θ0 is rebuilt
DEMO_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

NEW_FAMILY_TEXT = {"chain": "{n}-operand chains", "large": "three-operand problems with an answer above {top}"}

DESCRIPTION = (
    "Synthetic integer arithmetic (operands {lo}-{hi}, + and -, evaluated left to right). The student is a tiny "
    "{arch} ({params:,} parameters, {layers} layers, width {hidden}, word-level vocabulary of {vocab}) pretrained on "
    "{pretrained_on} problems in teacher A's terse style ('25+17=42,42-19=23.####23'): {acc:.1%} held-out greedy "
    "accuracy on the old family, {acc_new:.1%} on the new family ({new_family}){saw_new}. It is then continually "
    "distilled on {n_train} traces of teacher B ({new_pct:.0%} of them on the new family) written in B's style, "
    "e.g. '{example}'. Held-out problems (by a hash of the operands) were never seen in pretraining or "
    "distillation."
)


@dataclass
class DemoAssets:
    """Paths the pipeline needs, plus what was built."""

    base_model_dir: Path
    tokenizer_dir: Path
    train_path: Path  # teacher-B traces, JSONL {id, prompt, response, answer}
    heldout_path: Path  # held-out problems of both families, JSONL (teacher-B reference responses)
    heldout_family_paths: dict  # family ("old" / "new") -> its held-out JSONL
    description: str
    info: dict = field(default_factory=dict)  # pretraining summary, specs, timings


def _write_jsonl(path: Path, records) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _pretrain_base(base_dir: Path, tok, task: TaskSpec, model_spec: TinyModelSpec, pspec: PretrainSpec, data: dict,
                   *, settings: dict, seed: int, eval_max_new_tokens: int, log) -> dict:
    """Pretrain θ0 on teacher A, check it on the held-out families and save it atomically; return its info."""
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t0 = time.time()
    net = build_model(model_spec, tok, seed=seed)
    n_params = sum(p.numel() for p in net.parameters())
    log(f"demo: pretraining a {n_params:,}-parameter {model_spec.arch} on teacher A for {pspec.steps} steps")
    summary = pretrain(net, tok, task, pspec, log=log)
    acc, _ = answer_accuracy(net, tok, data["heldout_old"], max_new_tokens=eval_max_new_tokens)
    acc_new, _ = answer_accuracy(net, tok, data["heldout_new"], max_new_tokens=eval_max_new_tokens)
    info = {
        "settings": settings,
        "n_params": n_params,
        "vocab_size": len(tok),
        "heldout_acc_teacher_a": acc,
        "heldout_acc_new_family": acc_new,
        "pretrain_seconds": summary["seconds"],
        "final_loss_ema": summary["final_loss_ema"],
        "total_seconds": time.time() - t0,
    }
    with atomic_path(base_dir, is_dir=True) as tmp:
        net.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / ".done.json", info)
    log(f"demo: base model ready, held-out accuracy {acc:.3f} on the old family, {acc_new:.3f} on the new "
        f"({summary['seconds']:.0f}s)")
    return info


def _demo_description(task: TaskSpec, model_spec: TinyModelSpec, pspec: PretrainSpec, info: dict, data: dict, *,
                      n_train: int, new_fraction: float) -> str:
    """The run description the demo's report starts with."""
    return DESCRIPTION.format(
        lo=task.lo,
        hi=task.hi,
        arch={"llama": "Llama", "qwen3": "Qwen3"}[model_spec.arch],
        params=info["n_params"],
        layers=model_spec.num_hidden_layers,
        hidden=model_spec.hidden_size,
        vocab=info["vocab_size"],
        acc=info["heldout_acc_teacher_a"],
        acc_new=info["heldout_acc_new_family"],
        n_train=n_train,
        new_pct=new_fraction,
        pretrained_on="two- and three-operand" if pspec.short_prob > 0 else "three-operand",
        new_family=NEW_FAMILY_TEXT[task.new_skill].format(n=task.new_operands, top=2 * task.hi),
        saw_new=f" ({pspec.new_prob:.0%} of its pretraining problems were of it)" if pspec.new_prob > 0 else (
            ", which it never saw"),
        example=next(r["response"] for r in data["train_b"] if family_of(r, task) == "new"),
    )


def prepare_demo(
    run_dir,
    *,
    seed: int = 0,
    pretrain_steps: int | None = None,
    task: TaskSpec | None = None,
    model: TinyModelSpec | None = None,
    pretrain_spec: PretrainSpec | None = None,
    n_train: int = 200,
    n_heldout: int = 100,
    new_fraction: float = 0.5,
    check_step: bool = True,
    style: str = "verbose",
    eval_max_new_tokens: int = 64,
    log=print,
) -> DemoAssets:
    """Build (or reuse) the demo's data, tokenizer and pretrained base model under ``run_dir/demo``.

    ``pretrain_steps`` overrides ``pretrain_spec.steps`` (tests use a handful); ``eval_max_new_tokens``
    bounds the greedy held-out check of θ0 recorded in ``info``. Every output is written
    atomically; a finished base model (``base_model/.done.json`` present with the same settings) is reused.
    """
    task = task or TaskSpec()
    model_spec = model or TinyModelSpec()
    pspec = pretrain_spec or PretrainSpec(seed=seed)
    if pretrain_steps is not None:
        if pretrain_steps < 1:
            raise ValueError(f"prepare_demo: pretrain_steps must be >= 1, got {pretrain_steps}")
        pspec = PretrainSpec(**{**pspec.to_dict(), "steps": int(pretrain_steps)})
    if pspec.seed != seed:
        pspec = PretrainSpec(**{**pspec.to_dict(), "seed": seed})

    root = Path(run_dir) / "demo"
    root.mkdir(parents=True, exist_ok=True)
    data = make_datasets(seed, task, n_train=n_train, n_heldout=n_heldout, new_fraction=new_fraction,
                         check_step=check_step, style=style)
    train_path, heldout_path = root / "train_teacher_b.jsonl", root / "heldout.jsonl"
    _write_jsonl(train_path, data["train_b"])
    _write_jsonl(heldout_path, data["heldout"])
    family_paths = {}
    for f in FAMILIES:
        family_paths[f] = root / f"heldout_{f}.jsonl"
        _write_jsonl(family_paths[f], data[f"heldout_{f}"])
    _write_jsonl(root / "train_teacher_a.jsonl", data["train_a"])

    # θ0 depends on the operand range and the held-out split, and on the new family only when it sees some of it
    # (or when the new skill carves the old family: ``large`` answers are not in it).
    keys = ("lo", "hi", "heldout_percent") + (("new_skill",) if task.new_skill != "chain" else ()) + (
        ("new_skill", "new_operands") if pspec.new_prob > 0 else ())
    pretrain_task = {k: v for k, v in asdict(task).items() if k in keys}
    settings = {"seed": seed, "task": pretrain_task, "model": model_spec.to_dict(), "pretrain": pspec.to_dict(),
                "pretrain_version": PRETRAIN_VERSION}
    tok_dir, base_dir = root / "tokenizer", root / "base_model"
    done_path = base_dir / ".done.json"
    tok = build_tokenizer(task)
    if not (tok_dir / "tokenizer.json").exists():
        with atomic_path(tok_dir, is_dir=True) as tmp:
            tok.save_pretrained(tmp)

    if done_path.exists() and read_json(done_path).get("settings") == settings:
        info = read_json(done_path)
        log(f"demo: reusing pretrained base model in {base_dir}")
    else:
        info = _pretrain_base(base_dir, tok, task, model_spec, pspec, data, settings=settings, seed=seed,
                              eval_max_new_tokens=eval_max_new_tokens, log=log)

    desc = _demo_description(task, model_spec, pspec, info, data, n_train=n_train, new_fraction=new_fraction)
    return DemoAssets(
        base_model_dir=base_dir,
        tokenizer_dir=base_dir,
        train_path=train_path,
        heldout_path=heldout_path,
        heldout_family_paths=family_paths,
        description=desc,
        info=info,
    )
