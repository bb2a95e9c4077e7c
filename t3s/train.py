"""The AR training recipe: SFT, T3S, −T3S and the static baselines are one loop with different token weights.

Read it top to bottom like a torchtune recipe: :meth:`SFTRecipe.setup` builds everything,
:meth:`SFTRecipe.train` runs the loop, :meth:`SFTRecipe.save_checkpoint` writes a Hugging Face folder
atomically, :meth:`SFTRecipe.cleanup` releases the process group.

* The loss owns the output layer: every training loss goes through ``t3s_kernels``'s
  :class:`~t3s_kernels.FusedLossCausalLM` (hidden states + the model's own LM-head weight -> fused
  cross-entropy), never ``model(...).logits``.
* Per-token weights: an example's ``token_weight`` (a T3S / −T3S / static / random selection, 0/1) multiplies
  its token losses; without one every response token has weight 1 (plain SFT).
* Gradient accumulation is exact: the loss of every micro-batch is divided by the total weight of the whole
  optimizer step, summed over its micro-batches and all ranks (one all-reduce of a device tensor, no host sync).
* The global batch of a step is the same whatever the number of ranks, so a 2-process run follows the
  single-process run.
* Every ``accuracy.every`` steps (and at step 0) the caller's ``evaluate`` hooks run (training accuracy,
  diagnostics); an online :class:`~t3s.bottleneck.OnlineBottleneckDetector` keeps the lowest-accuracy
  checkpoint as θb and can stop the run early.
* Under ``torchrun``: FSDP2 (``fully_shard`` per decoder layer, then the root) or DDP; gloo on CPU.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from t3s import distributed as D
from t3s.bottleneck import Bottleneck, OnlineBottleneckDetector
from t3s.config import Config
from t3s.data import IGNORE_INDEX, TokenizedExample, collate, pack_examples
from t3s.io import TIMINGS_FILE, atomic_path, write_json_atomic
from t3s.packing import model_attn_implementation, packed_model_inputs, resolve_attn_implementation
from t3s.schedule import lr_scheduler

EvalHook = Callable[["SFTRecipe", int], dict[str, float]]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Model loading


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """A tokenizer from a local folder (nothing is downloaded)."""
    from transformers import AutoTokenizer

    _require_local(path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, dtype: str = "fp32", attn_implementation: str | None = None,
               device: torch.device | str = "cpu", trust_remote_code: bool = False) -> nn.Module:
    """A Hugging Face causal LM from a local folder, on ``device``."""
    from transformers import AutoModelForCausalLM

    _require_local(path, "model")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars only
    kw: dict[str, Any] = {"dtype": _DTYPES[dtype], "local_files_only": True, "trust_remote_code": trust_remote_code}
    attn_implementation = resolve_attn_implementation(attn_implementation, device)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kw).to(device)


def _require_local(path: str, what: str) -> None:
    if not path:
        raise ValueError(f"no {what} path given (set model.path)")
    if not Path(path).is_dir():
        raise ValueError(f"{what} path {path!r} is not a local folder; models and tokenizers are loaded from "
                         "local paths only (nothing is downloaded)")


def scored_rows(labels: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """Flat indices of the hidden-state rows the shifted loss scores (row ``t`` predicts ``labels[..., t + 1]``
    with a nonzero weight): the ``active_rows`` of :func:`t3s_kernels.linear_cross_entropy`, so the fused loss
    gathers them without reading a count back from the device."""
    scored = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    scored[..., :-1] = (labels[..., 1:] != IGNORE_INDEX) & (token_weight[..., 1:] != 0)
    return torch.nonzero(scored.reshape(-1)).reshape(-1)


class Policy(nn.Module):
    """The causal LM and the fused loss that owns its output layer, behind one ``forward``.

    One root module means one FSDP / DDP root: generation (``mode="lm"``), training losses (``mode="loss"``)
    and per-token log-probs (``mode="logprobs"``) all unshard the parameters the same way.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        from t3s_kernels import FusedLossCausalLM

        self.lm = lm
        self.loss_model = FusedLossCausalLM(lm)

    def forward(self, mode: str = "lm", **kw):
        if mode == "loss":
            return self.loss_model(**kw)
        if mode == "logprobs":
            return self.loss_model.token_logprobs(**kw)
        if mode == "lm":
            return self.lm(**kw)
        raise ValueError(f"Policy mode must be loss, logprobs or lm, got {mode!r}")

    @property
    def generation_config(self):
        return self.lm.generation_config


def reshard_root(policy: nn.Module) -> None:
    """Call after no-grad forwards (generation, log-probs) through an FSDP2 root.

    FSDP2 does not reshard the root after its forward; a forward with grad that follows a no-grad one then
    skips the root's gradient reduce-scatter (seen with torch 2.13 on gloo). Resharding restores it.
    """
    if hasattr(policy, "reshard"):
        policy.reshard()


def lm_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The causal LM's full state dict on CPU (gathered under FSDP2; a collective, call on every rank)."""
    inner = policy.module if isinstance(policy, nn.parallel.DistributedDataParallel) else policy
    if D.is_distributed() and not isinstance(policy, nn.parallel.DistributedDataParallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    sd = {k[len("lm."):]: v for k, v in sd.items() if k.startswith("lm.")}
    # A gathered FSDP2 state dict also lists tied copies (lm_head.weight); save_pretrained's own dict does not.
    tied = getattr(inner.lm, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(inner.lm.config, "tie_word_embeddings", False):
        for key in tied:
            sd.pop(key, None)
    return sd


def save_hf_checkpoint(lm: nn.Module, state_dict: dict, path: str | Path, tokenizer=None) -> Path:
    """Write ``save_pretrained`` output to ``path`` atomically (a folder renamed into place)."""
    with atomic_path(path, is_dir=True) as tmp:
        lm.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Optimizer schedule


def batch_schedule(num_examples: int, batch_size: int, steps: int, seed: int, shuffle: bool = True
                   ) -> list[list[int]]:
    """Example indices of every optimizer step: passes over a seeded permutation, wrapping across epochs."""
    if num_examples == 0:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    stream: list[int] = []
    out = []
    for _ in range(steps):
        while len(stream) < batch_size:
            perm = list(range(num_examples))
            if shuffle:
                rng.shuffle(perm)
            stream += perm
        out.append(stream[:batch_size])
        stream = stream[batch_size:]
    return out


# ----------------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class TrainResult:
    out_dir: str
    steps_run: int
    stopped_early: bool
    final_dir: str | None
    bottleneck: dict | None
    curve: dict[int, float] = field(default_factory=dict)
    """Training accuracy per evaluated step (empty when no accuracy hook ran)."""

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "steps_run": self.steps_run, "stopped_early": self.stopped_early,
                "final_dir": self.final_dir, "bottleneck": self.bottleneck,
                "curve": {str(k): v for k, v in self.curve.items()}}


class SFTRecipe:
    """Weighted-token SFT of a Hugging Face causal LM from a local checkpoint.

    Features: per-token weights, AdamW with warm-up + cosine/constant schedule, gradient accumulation with
    an exact token normaliser, gradient clipping, bf16 autocast, gradient checkpointing, sequence packing,
    evaluation hooks every ``accuracy.every`` steps, online bottleneck detection with early stop, atomic
    checkpoints, FSDP2 / DDP under ``torchrun``.

    Args:
        cfg: the run config (``optim``, ``train``, ``accuracy``, ``bottleneck``, ``distributed``, ``model``).
        examples: tokenized training examples; ``token_weight`` set on them selects tokens.
        out_dir: where ``metrics.jsonl``, ``timings.jsonl`` (wall-clock seconds), ``summary.json`` and
            checkpoints go.
        init_path: the starting checkpoint (default ``cfg.model.path``).
        evaluate: hooks run at step 0 and every ``accuracy.every`` steps; each returns metrics. A
            ``train_accuracy`` metric feeds the bottleneck detector.
        track_bottleneck: keep the lowest-accuracy checkpoint in ``out_dir/bottleneck`` (and stop early when
            ``bottleneck.method=online`` with ``stop_early``; at ``bottleneck.step`` for ``fixed``).
        steps: override ``train.steps`` (the schedule is still computed for ``train.steps``).
        save_final: save the last model to ``out_dir/final``.

    Raises:
        ValueError: no examples, an example without response tokens, a batch size that does not divide
            across ranks, a model or tokenizer path that is not a local folder.
    """

    def __init__(self, cfg: Config, examples: Sequence[TokenizedExample], out_dir: str | Path, *,
                 init_path: str | None = None, evaluate: Sequence[EvalHook] = (),
                 track_bottleneck: bool = False, steps: int | None = None, save_final: bool = True,
                 name: str = "train", progress: bool = True):
        if not examples:
            raise ValueError("no training examples")
        self.cfg, self.examples, self.out_dir = cfg, list(examples), Path(out_dir)
        self.init_path = init_path or cfg.model.path
        self.hooks, self.track_bottleneck = list(evaluate), track_bottleneck
        self.steps = steps if steps is not None else cfg.train.steps
        self.save_final, self.name, self.progress = save_final, name, progress

    # ---- setup --------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        backend = None if cfg.distributed.backend == "auto" else cfg.distributed.backend
        D.init_distributed(backend)
        self.rank, self.world = D.rank(), D.world_size()
        self.device = D.device()
        torch.manual_seed(cfg.train.seed)
        if cfg.train.batch_size % self.world:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide across {self.world} ranks")

        trust = cfg.model.trust_remote_code
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=trust)
        self.lm = load_model(self.init_path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                             device=self.device, trust_remote_code=trust)
        if cfg.train.gradient_checkpointing:
            if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5.x
                self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.lm.config.use_cache = False
        self.policy = self._wrap(Policy(self.lm))

        decay, no_decay = [], []
        for n, p in self.policy.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        o = cfg.optim
        self.scheduler = lr_scheduler(self.optimizer, total_steps=cfg.train.steps, warmup_steps=o.warmup_steps,
                                      schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)

        for ex in self.examples:
            if all(label == IGNORE_INDEX for label in ex.labels):
                raise ValueError(f"example {ex.id!r} has no response tokens to train on")
        self.batches = batch_schedule(len(self.examples), cfg.train.batch_size, self.steps, cfg.train.seed,
                                      cfg.train.epochs_shuffle)
        b = cfg.bottleneck  # argmin keeps the strict minimum; min_delta is part of the online rule only
        self.detector = OnlineBottleneckDetector(patience=b.patience, min_step=b.min_step,
                                                 min_delta=b.min_delta if b.method == "online" else 0.0)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.train.autocast == "bf16" else contextlib.nullcontext())
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for log in ("metrics.jsonl", TIMINGS_FILE):  # a re-run starts fresh logs
                (self.out_dir / log).write_text("", encoding="utf-8")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _wrap(self, policy: Policy) -> nn.Module:
        if not D.is_distributed():
            return policy
        if self.cfg.distributed.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(policy, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        layer_names = set(getattr(self.lm, "_no_split_modules", None) or [])
        for module in self.lm.modules():
            if type(module).__name__ in layer_names:
                fully_shard(module)
        fully_shard(policy)
        return policy

    # ---- train --------------------------------------------------------------------------------------------

    def _micro_batches(self, indices: list[int]) -> list[dict]:
        """This rank's share of a step's examples, as padded (or packed) micro-batches."""
        per_rank = len(indices) // self.world
        mine = [self.examples[i] for i in indices[self.rank * per_rank : (self.rank + 1) * per_rank]]
        mbs = self.cfg.train.micro_batch_size
        chunks = [mine[i : i + mbs] for i in range(0, len(mine), mbs)]
        pad = self.tokenizer.pad_token_id
        out = []
        for chunk in chunks:
            if self.cfg.train.packing:
                for row in pack_examples(chunk, max_tokens=max(self.cfg.data.max_length, max(map(len, chunk)))):
                    # per-document attention from position_ids (varlen flash; transformers builds the mask otherwise)
                    batch = {k: v for k, v in packed_model_inputs(row, model_attn_implementation(self.lm)).items()
                             if v is not None}
                    batch.update(labels=row.labels, token_weight=row.token_weight if row.token_weight is not None
                                 else (row.labels != IGNORE_INDEX).float())
                    out.append(batch)
            else:
                batch = collate(chunk, pad)
                if "token_weight" not in batch:
                    batch["token_weight"] = (batch["labels"] != IGNORE_INDEX).float()
                batch.pop("target_mask", None)
                out.append(batch)
        for b in out:  # built on the host: the loss gets its active-row index without a device sync
            b["active_rows"] = scored_rows(b["labels"], b["token_weight"])
        return [{k: v.to(self.device) for k, v in b.items()} for b in out]

    def _normalizer(self, micro_batches: list[dict]) -> torch.Tensor:
        """Total token weight of the optimizer step over all micro-batches and ranks (a device tensor)."""
        total = sum(((b["labels"] != IGNORE_INDEX).float() * b["token_weight"]).sum() for b in micro_batches)
        total = torch.as_tensor(total, dtype=torch.float32, device=self.device).reshape(())
        if self.world > 1:
            dist.all_reduce(total)
        return total

    def train_step(self, indices: list[int]) -> dict[str, float]:
        self.policy.train()
        micro = self._micro_batches(indices)
        norm = self._normalizer(micro)
        safe_norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # nothing to train: loss 0, not NaN
        loss_sum = torch.zeros((), device=self.device)
        for b in micro:
            with self.autocast:
                out = self.policy(mode="loss", input_ids=b["input_ids"], labels=b["labels"],
                                  attention_mask=b.get("attention_mask"), position_ids=b.get("position_ids"),
                                  token_weight=b["token_weight"], normalizer=safe_norm, reduction="mean",
                                  active_rows=b["active_rows"])
            # DDP / FSDP average gradients over ranks; the loss is already normalised globally, so undo it.
            (out.loss * self.world).backward()
            loss_sum += out.loss.detach()
        if self.world > 1:
            dist.all_reduce(loss_sum)
        grad_norm = None
        if self.cfg.optim.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss_sum), "tokens": float(norm), "lr": lr,
                "grad_norm": float(_full(grad_norm)) if grad_norm is not None else None}

    def train(self) -> TrainResult:
        cfg, b = self.cfg, self.cfg.bottleneck
        curve: dict[int, float] = {}
        stopped, step = False, 0
        bar = tqdm(total=self.steps, desc=self.name, disable=not (self.progress and self.is_main), leave=False)
        t0 = time.time()
        for step in range(0, self.steps + 1):
            is_eval = step % cfg.accuracy.every == 0 or step == self.steps
            metrics = self._evaluate(step) if is_eval else {}
            if "train_accuracy" in metrics:
                curve[step] = metrics["train_accuracy"]
                bar.set_postfix(acc=f"{metrics['train_accuracy']:.2f}")
            at_fixed = b.method == "fixed" and step == b.step
            if self.track_bottleneck and (is_eval or at_fixed) and self._bottleneck_stop(step, metrics):
                stopped = step < self.steps
                break
            if step == self.steps:
                break
            row = self.train_step(self.batches[step])
            row.update(step=step + 1)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == self.steps:
                self._log(row)
                self._log({"step": step + 1, "time": round(time.time() - t0, 3)}, TIMINGS_FILE)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            bar.update(1)
        bar.close()
        final_dir = None
        if self.save_final:
            final_dir = str(self.out_dir / "final")
            self.save_checkpoint(final_dir, with_tokenizer=True)
        bn = self._bottleneck_result() if self.track_bottleneck else None
        result = TrainResult(str(self.out_dir), step, stopped, final_dir, bn.to_dict() if bn else None, curve)
        if self.is_main:
            write_json_atomic(self.out_dir / "summary.json", result.to_dict())
        D.barrier()
        return result

    def _evaluate(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for hook in self.hooks:
            metrics.update(hook(self, step))
        if metrics:
            self._log({"step": step, **metrics})
        if self.cfg.train.keep_checkpoints:
            self.save_checkpoint(self.out_dir / "checkpoints" / f"step_{step:06d}")
        return metrics

    def _bottleneck_stop(self, step: int, metrics: dict) -> bool:
        """Track θb; True when the run should stop here."""
        b = self.cfg.bottleneck
        if b.method == "fixed":
            if "train_accuracy" in metrics:
                self.detector.history[step] = metrics["train_accuracy"]
            if step == b.step:
                self.save_checkpoint(self.out_dir / "bottleneck")
                return b.stop_early
            return False
        if "train_accuracy" not in metrics:
            raise ValueError("bottleneck tracking needs a training-accuracy hook (or bottleneck.method=fixed)")
        if self.detector.update(step, metrics["train_accuracy"]):
            self.save_checkpoint(self.out_dir / "bottleneck")
        return b.method == "online" and b.stop_early and self.detector.confirmed

    def _bottleneck_result(self) -> Bottleneck:
        b = self.cfg.bottleneck
        if b.method == "fixed":
            return Bottleneck(b.step, self.detector.history.get(b.step), "fixed")
        res = self.detector.result()
        res.method = b.method
        return res

    def _log(self, row: dict, name: str = "metrics.jsonl") -> None:
        if self.is_main:
            path = self.out_dir / name
            try:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:  # an append names no file when it fails: name it
                e.filename = e.filename or str(path)
                raise

    # ---- checkpoint ---------------------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path, *, with_tokenizer: bool = False) -> None:
        sd = lm_state_dict(self.policy)  # collective under FSDP2
        if self.is_main:
            save_hf_checkpoint(self.lm, sd, path, self.tokenizer if with_tokenizer else None)
        D.barrier()

    # ---- cleanup ------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Release the optimizer state and the model (the process group stays for the next stage)."""
        for name in ("optimizer", "scheduler", "policy", "lm"):
            self.__dict__.pop(name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 grad norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_training(cfg: Config, examples: Sequence[TokenizedExample], out_dir: str | Path, **kw) -> TrainResult:
    """``setup -> train -> cleanup`` in one call."""
    recipe = SFTRecipe(cfg, examples, out_dir, **kw)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


# ----------------------------------------------------------------------------------------------------------
# Evaluation hooks


def accuracy_hook(prompts: Sequence[Sequence[int]], golds: Sequence[str], *, verifier: Callable[[str, str], bool],
                  max_new_tokens: int | None = None, batch_size: int, curve: dict[int, float] | None = None,
                  sampling: Any = None, check: Callable[[int, dict], None] | None = None) -> EvalHook:
    """Training accuracy at a step: generation + answer check, or a value from a precomputed curve.

    Returns ``train_accuracy`` and the shares of truncated / answerless completions (:meth:`AccuracyResult.
    metrics`); ``check(step, metrics)`` may raise to stop a run whose evaluation cannot see the answers.
    """
    from t3s.generate import SamplingConfig, answer_accuracy, stop_token_ids

    if sampling is None:
        sampling = SamplingConfig(max_new_tokens=int(max_new_tokens))

    def hook(recipe: SFTRecipe, step: int) -> dict[str, float]:
        if curve is not None:
            if step not in curve:
                raise ValueError(f"accuracy curve has no value for step {step} (it has {sorted(curve)})")
            return {"train_accuracy": float(curve[step])}
        res = answer_accuracy(_Generator(recipe), recipe.tokenizer, prompts, golds, verifier=verifier,
                              sampling=sampling, batch_size=batch_size,
                              progress=recipe.progress, desc=f"{recipe.name} acc@{step}")
        reshard_root(recipe.policy)
        metrics = res.metrics("train")
        if check is not None:
            check(step, metrics)
        return metrics

    hook.stop_ids = stop_token_ids  # for introspection in tests
    return hook


class _Generator(nn.Module):
    """Makes the (possibly sharded) policy look like a causal LM to :func:`t3s.generate.generate_greedy`."""

    def __init__(self, recipe: SFTRecipe):
        super().__init__()
        self._recipe = recipe

    def forward(self, **kw):
        return self._recipe.policy(mode="lm", **kw)

    def parameters(self, recurse: bool = True):
        return self._recipe.lm.parameters(recurse)

    @property
    def generation_config(self):
        return self._recipe.lm.generation_config

    def train(self, mode: bool = True):
        self._recipe.policy.train(mode)
        return self

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self._recipe.policy.training

    @training.setter
    def training(self, value: bool) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# Block diffusion (dLLM T3S): the loop lives in t3s.dllm; this wires the config to it.


def run_dllm_training(cfg: Config, examples: Sequence[TokenizedExample], out_dir: str | Path) -> Path:
    """Block-diffusion SFT / T3S (``train.mode=dllm``; ``cfg.dllm`` holds :class:`t3s.dllm.DLLMConfig`).

    Examples carrying ``target_mask`` (a ``dllm_targets`` selection) get the union mask. Single process.
    Writes ``metrics.jsonl`` and ``final/`` (a Hugging Face checkpoint) under ``out_dir``.
    """
    from t3s.dllm import resolve_dllm_config, train_dllm

    if D.launched_distributed():
        raise ValueError("train.mode=dllm runs on a single process (t3s.dllm.train_dllm); launch without torchrun")
    trust = cfg.model.trust_remote_code
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=trust)
    dllm_cfg = resolve_dllm_config(cfg.dllm, tok)  # fail on a bad dllm config before any output exists
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    lm = load_model(cfg.model.path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                    device=D.device(), trust_remote_code=trust)
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as f:
        train_dllm(lm, examples, cfg=dllm_cfg, tokenizer=tok, steps=cfg.train.steps, batch_size=cfg.train.batch_size,
                   micro_batch_size=cfg.train.micro_batch_size, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                   betas=tuple(cfg.optim.betas), warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.schedule,
                   min_lr_ratio=cfg.optim.min_lr_ratio,
                   max_grad_norm=cfg.optim.max_grad_norm, shuffle_seed=cfg.train.seed,
                   log=lambda row: (f.write(json.dumps(row) + "\n"), f.flush()))
    sd = {k: v.detach().cpu() for k, v in lm.state_dict().items()}
    return save_hf_checkpoint(lm, sd, out / "final", tok)
