"""Generation backends and answer accuracy (training accuracy for the bottleneck; held-out evaluation).

One interface, :class:`GenerationBackend`: ``generate(prompts, sampling)`` takes token-id prompts and a
:class:`SamplingConfig` (max new tokens, greedy or temperature / top-p, ``num_samples`` per prompt, seed) and
returns, per prompt, ``num_samples`` :class:`Completion` s with their text, token ids and finish reason
(``stop``: an end token; ``length``: ``max_new_tokens`` reached — a truncated generation).

* :class:`HFBackend` (default; CPU or one GPU; what the tests use): a KV-cache loop over a Hugging Face causal
  LM with left padding. Prompts are sorted by length and cut into batches; each batch runs until every row has
  produced an end token or ``max_new_tokens`` tokens. Under ``torchrun`` the prompts are sharded across ranks;
  every rank runs the same number of batches and decoding steps (FSDP needs every rank in every forward).
* :class:`VLLMBackend` (optional extra ``pip install 't3s[vllm]'``, GPU): one ``vllm.LLM`` engine per
  checkpoint (tensor-parallel, continuous batching), the same sampling settings mapped onto
  ``vllm.SamplingParams``. ``vllm`` is imported only when this backend is built.

:func:`answer_accuracy` generates and checks every completion against its gold answer; its
:class:`AccuracyResult` also counts truncated completions and completions with no extractable answer, so a
curve that cannot see the answers (``max_new_tokens`` too small for the traces) is caught, not used.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

BACKENDS = ("hf", "vllm")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids as the model sees them before its answer (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def stop_token_ids(model: Any, tokenizer) -> list[int]:
    """End-of-answer ids: the tokenizer's EOS plus the model's generation-config EOS (may be a list)."""
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    if not ids:
        raise ValueError("tokenizer and model define no eos_token_id; generation would never stop early")
    return sorted(ids)


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn; recorded with every accuracy measurement.

    ``temperature=0`` is greedy decoding (then ``num_samples`` must be 1: greedy samples are identical).
    With ``temperature > 0`` every prompt gets ``num_samples`` completions (the paper averages 16 runs per
    benchmark) and the accuracy is their mean; ``seed`` makes the draws repeatable.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError(f"num_samples={self.num_samples} with greedy decoding (temperature 0) repeats the "
                             "same completion; set a temperature > 0 or num_samples=1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    """``stop`` (an end token was produced) or ``length`` (``max_new_tokens`` reached: truncated)."""


class GenerationBackend:
    """Generates ``sampling.num_samples`` completions per token-id prompt (see the module docstring)."""

    name = "base"

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine (GPU memory); the backend is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _forward(model, **kw):
    try:
        return model(**kw, logits_to_keep=1)
    except TypeError:  # older / custom models without logits_to_keep
        return model(**kw)


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or temperature / nucleus sampling from ``[B, V]`` logits, in fp32."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_token_ids: Sequence[int], pad_token_id: int, batch_size: int = 32,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress: bool = False,
                    desc: str = "generate") -> list[tuple[list[int], str]]:
    """``(token ids, finish reason)`` for every prompt of *this rank*, in input order (end token excluded).

    When a process group is initialised, call it on every rank with each rank's own prompts; the number of
    batches and decoding steps is synchronised so sharded models never deadlock.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be generated from")
    device = _device_of(model)
    eos = torch.tensor(list(eos_token_ids), device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = _world()
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed) * 1_000_003 + rank)
    n_batches = len(batches)
    if world > 1:  # every rank must run the same number of forwards
        t = torch.tensor([n_batches], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_batches = int(t.item())
    was_training = model.training
    model.eval()
    out: list[tuple[list[int], str] | None] = [None] * len(prompts)
    for b in tqdm(range(n_batches), desc=desc, disable=not progress, leave=False):
        idx = batches[b] if b < len(batches) else batches[-1][:1] if batches else []
        dummy = b >= len(batches)
        rows = [list(prompts[i]) for i in idx] or [[pad_token_id]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row, device=device)
            mask[r, width - len(row):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new = torch.empty((len(rows), 0), dtype=torch.long, device=device)
        past = None
        step_ids, step_pos = ids, pos
        for _ in range(max_new_tokens):
            res = _forward(model, input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                           past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = _next_tokens(res.logits[:, -1], temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            new = torch.cat([new, nxt[:, None]], dim=1)
            done = done | torch.isin(nxt, eos)
            all_done = done.all()
            if world > 1:
                flag = (~all_done).to(torch.int32).reshape(1)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                all_done = flag.item() == 0
            if bool(all_done):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt[:, None]
        if dummy:
            continue
        stops = {int(e) for e in eos_token_ids}
        for r, i in enumerate(idx):
            toks = new[r].tolist()
            cut = next((j for j, t in enumerate(toks) if t in stops), None)
            out[i] = (toks, "length") if cut is None else (toks[:cut], "stop")
    model.train(was_training)
    return [o if o is not None else ([], "length") for o in out]


@torch.no_grad()
def generate_greedy(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_token_ids: Sequence[int], pad_token_id: int, batch_size: int = 32,
                    progress: bool = False, desc: str = "generate") -> list[list[int]]:
    """Greedy completions (token ids, end token excluded) for every prompt of *this rank*, in input order."""
    return [t for t, _ in generate_tokens(model, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                                          pad_token_id=pad_token_id, batch_size=batch_size, progress=progress,
                                          desc=desc)]


class HFBackend(GenerationBackend):
    """Generation with the Hugging Face model already in memory (the training policy, or a loaded checkpoint).

    Under ``torchrun`` call :meth:`generate` on every rank with the same full prompt list: each rank decodes
    its share (round-robin) and the completions are gathered, so every rank returns all of them.
    """

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 32, progress: bool = False,
                 desc: str = "generate"):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.progress, self.desc = progress, desc

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        rank, world = _world()
        flat = [(i, s) for i in range(len(prompts)) for s in range(sampling.num_samples)]
        mine = flat[rank::world]
        eos = stop_token_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        outs = generate_tokens(self.model, [prompts[i] for i, _ in mine], max_new_tokens=sampling.max_new_tokens,
                               eos_token_ids=eos, pad_token_id=pad, batch_size=self.batch_size,
                               temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                               progress=self.progress and rank == 0, desc=self.desc)
        rows = [(i, s, toks, reason) for (i, s), (toks, reason) in zip(mine, outs, strict=True)]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, rows)
            rows = [r for g in gathered for r in g]
        result: list[list[Completion | None]] = [[None] * sampling.num_samples for _ in prompts]
        for i, s, toks, reason in rows:
            result[i][s] = Completion(toks, self.tokenizer.decode(toks, skip_special_tokens=True), reason)
        return result  # type: ignore[return-value]


class VLLMBackend(GenerationBackend):
    """A ``vllm.LLM`` engine on one checkpoint folder (start it once per evaluation pass, then :meth:`close`).

    Args:
        model_path: local Hugging Face checkpoint folder (a saved trajectory checkpoint, θ0, a variant's final).
        tokenizer: local tokenizer folder (the run's tokenizer: prompts are token ids, decoding uses it too).
        tensor_parallel_size: GPUs the engine shards the model over.
        dtype: ``auto`` / ``bfloat16`` / ``float32`` ... (vLLM's names).
        trust_remote_code: passed to vLLM (``model.trust_remote_code``).
        gpu_memory_utilization, max_model_len, engine_kwargs: passed to ``vllm.LLM``.
        vllm_module: the module providing ``LLM`` and ``SamplingParams`` (default: ``import vllm``; tests
            pass a fake with the same interface).
    """

    name = "vllm"

    def __init__(self, model_path: str, *, tokenizer: str, tensor_parallel_size: int = 1, dtype: str = "auto",
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, engine_kwargs: dict | None = None, vllm_module: Any = None):
        if vllm_module is None:
            try:
                import vllm as vllm_module
            except ImportError as e:
                raise ImportError("generation.backend=vllm needs vLLM on a GPU machine: pip install 't3s[vllm]' "
                                  f"({e}); or use generation.backend=hf") from None
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self._vllm = vllm_module
        kw = dict(model=str(model_path), tokenizer=str(tokenizer), tensor_parallel_size=int(tensor_parallel_size),
                  dtype=dtype, trust_remote_code=bool(trust_remote_code),
                  gpu_memory_utilization=float(gpu_memory_utilization), **(engine_kwargs or {}))
        if max_model_len is not None:
            kw["max_model_len"] = int(max_model_len)
        self.engine_args = kw
        self.llm = vllm_module.LLM(**kw)

    def sampling_params(self, sampling: SamplingConfig, stop_ids: Sequence[int] | None = None):
        """The ``vllm.SamplingParams`` equivalent of ``sampling`` (greedy = temperature 0)."""
        kw = dict(n=sampling.num_samples, temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                  max_tokens=sampling.max_new_tokens, seed=sampling.seed, skip_special_tokens=True)
        if stop_ids:
            kw["stop_token_ids"] = [int(i) for i in stop_ids]
        return self._vllm.SamplingParams(**kw)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 stop_ids: Sequence[int] | None = None) -> list[list[Completion]]:
        if self.llm is None:
            raise RuntimeError("this VLLMBackend was closed")
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = self.llm.generate(requests, self.sampling_params(sampling, stop_ids), use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        result = []
        for req in outputs:
            comps = [Completion(list(o.token_ids), o.text,
                                "length" if o.finish_reason == "length" else "stop") for o in req.outputs]
            if len(comps) != sampling.num_samples:
                raise RuntimeError(f"vLLM returned {len(comps)} samples, asked for {sampling.num_samples}")
            result.append(comps)
        return result

    def close(self) -> None:
        """Drop the engine and free its GPU memory so the next checkpoint's engine fits."""
        if getattr(self, "llm", None) is None:
            return
        self.llm = None
        try:  # vLLM keeps a model-parallel group per engine; tear it down before the next one
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # a fake engine, or a vLLM without these helpers: nothing more to release
            pass
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class AccuracyResult:
    accuracy: float
    """Mean correctness over every completion (prompts × samples)."""
    correct: int
    total: int
    completions: list[str] = field(default_factory=list)
    """Decoded completions, prompt-major (``num_samples`` per prompt)."""
    is_correct: list[bool] = field(default_factory=list)
    truncated: int = 0
    """Completions that hit ``max_new_tokens`` without an end token."""
    no_answer: int = 0
    """Completions with no extractable final answer (no ``\\boxed{}`` / ``####``)."""
    num_prompts: int = 0
    completion_tokens: list[int] = field(default_factory=list)

    @property
    def truncated_fraction(self) -> float:
        return self.truncated / self.total if self.total else 0.0

    @property
    def no_answer_fraction(self) -> float:
        return self.no_answer / self.total if self.total else 0.0

    def metrics(self, prefix: str = "train") -> dict[str, float]:
        """The numbers a trajectory row records (``<prefix>_accuracy``, truncated and no-answer shares)."""
        toks = self.completion_tokens
        return {f"{prefix}_accuracy": self.accuracy, f"{prefix}_truncated_fraction": self.truncated_fraction,
                f"{prefix}_no_answer_fraction": self.no_answer_fraction,
                f"{prefix}_mean_completion_tokens": float(sum(toks) / len(toks)) if toks else 0.0,
                f"{prefix}_max_completion_tokens": float(max(toks, default=0))}


def answer_accuracy(model: torch.nn.Module | GenerationBackend, tokenizer, prompts: Sequence[Sequence[int]],
                    golds: Sequence[Any], *, verifier: Callable[[str, Any], bool], max_new_tokens: int | None = None,
                    sampling: SamplingConfig | None = None, batch_size: int = 32, progress: bool = False,
                    desc: str = "accuracy") -> AccuracyResult:
    """Generate for every prompt (``sampling``, default greedy with ``max_new_tokens``) and check every completion.

    ``model`` is a Hugging Face causal LM (wrapped in :class:`HFBackend`) or any :class:`GenerationBackend`.
    Under ``torchrun`` (HF) pass the same full lists on every rank: every rank returns the global result.
    """
    from t3s.answers import extract_answer

    if len(prompts) != len(golds):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} gold answers")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if sampling is None:
        if max_new_tokens is None:
            raise ValueError("answer_accuracy needs max_new_tokens or a SamplingConfig")
        sampling = SamplingConfig(max_new_tokens=int(max_new_tokens))
    backend = model if isinstance(model, GenerationBackend) else HFBackend(
        model, tokenizer, batch_size=batch_size, progress=progress, desc=desc)
    outs = backend.generate(prompts, sampling)
    texts, ok, truncated, no_answer, lengths = [], [], 0, 0, []
    for comps, gold in zip(outs, golds, strict=True):
        for c in comps:
            texts.append(c.text)
            ok.append(bool(verifier(c.text, gold)))
            truncated += c.finish_reason == "length"
            no_answer += extract_answer(c.text) is None
            lengths.append(len(c.token_ids))
    correct, total = sum(ok), len(ok)
    return AccuracyResult(correct / max(total, 1), correct, total, texts, ok, truncated=truncated,
                          no_answer=no_answer, num_prompts=len(prompts), completion_tokens=lengths)


def subset_indices(n: int, k: int | None, seed: int = 0) -> list[int]:
    """A fixed, seeded subset of ``k`` of ``n`` indices (all when ``k`` is None or >= n), sorted."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def model_context_length(config: Any) -> int | None:
    """The longest sequence a model config supports (``max_position_embeddings`` and its aliases), or None."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(config, "text_config", None)
    return model_context_length(text) if text is not None and text is not config else None


def derive_max_new_tokens(response_lengths: Sequence[int], prompt_lengths: Sequence[int],
                          context_length: int | None) -> dict:
    """``max_new_tokens`` from the traces: the longest response in tokens, capped by the model's context.

    The cap is ``context_length - longest prompt`` (every prompt must fit with its completion). Returns the
    value and how it was derived (for the provenance).
    """
    if not response_lengths:
        raise ValueError("cannot derive max_new_tokens: no training responses")
    longest = int(max(response_lengths))
    info = {"max_new_tokens": longest, "derived_from": "longest training response", "longest_response": longest,
            "context_length": context_length, "longest_prompt": int(max(prompt_lengths, default=0))}
    if context_length is not None:
        room = int(context_length) - info["longest_prompt"]
        if room <= 0:
            raise ValueError(f"the longest prompt ({info['longest_prompt']} tokens) fills the model's context "
                             f"({context_length}); nothing can be generated")
        if room < longest:
            info.update(max_new_tokens=room, derived_from="model context minus the longest prompt")
    return info
