"""The run configuration: dataclasses with documented defaults, a YAML loader and ``key=value`` overrides.

A config file only names the keys it changes; everything else keeps the default written here (and in
``t3s/configs/default.yaml``, which documents every key). Overrides use dotted keys and YAML values::

    t3s run my.yaml train.steps=30 optim.lr=5e-4 variants=[sft,t3s] bottleneck.method=fixed

An unknown key is an error that names the key and lists close matches; a value of the wrong type is an
error that names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"

VARIANTS = ("sft", "t3s", "neg_t3s", "static_high_conf", "static_low_conf", "random", "rrt")
"""Trained / constructed variants the pipeline knows. ``base`` (θ0 itself) is always evaluated."""


DLLM_VARIANTS = ("sft", "t3s")
"""``train.mode=dllm``: block-diffusion SFT (random masks) and dLLM T3S (union mask with the targets)."""


def check_dllm_pipeline(cfg: Config) -> None:
    """What ``t3s run`` needs in ``train.mode=dllm`` (``t3s train --mode dllm`` needs none of it)."""
    if not cfg.model.selector:
        raise ConfigError("train.mode=dllm: set model.selector to the AR selector model (a causal LM sharing the "
                          "dLLM student's tokenizer); the SFT trajectory and Δc profiling run on it, as in the paper")
    bad = [v for v in cfg.variants if v not in DLLM_VARIANTS]
    if bad:
        raise ConfigError(f"variants: train.mode=dllm trains {', '.join(DLLM_VARIANTS)} only, got {', '.join(bad)} "
                          "(set variants=[sft,t3s])")


def trajectory_stops_early(cfg: Config) -> bool:
    """Whether the SFT trajectory may end before ``train.steps`` (then it has no final checkpoint θf)."""
    return cfg.bottleneck.stop_early and cfg.bottleneck.method in ("online", "fixed")


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type or inconsistent values."""


@dataclass
class ModelConfig:
    path: str = ""
    """Local Hugging Face causal-LM folder (θ0). Nothing is downloaded."""
    tokenizer: str | None = None
    """Local tokenizer folder; defaults to ``model.path``."""
    dtype: str = "fp32"
    """Parameter dtype: ``fp32`` or ``bf16`` (bf16 weights; use ``train.autocast`` for mixed precision)."""
    attn_implementation: str | None = None
    """Passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``); ``auto`` = flash_attention_2
    when flash-attn is installed on CUDA, else sdpa (``t3s.packing``); None = library default."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own Python code (needed by e.g. LLaDA-2.0); off by default, recorded in every
    provenance file. Only enable it for checkpoints you trust."""
    selector: str | None = None
    """``train.mode=dllm``: local folder of the AR selector M0 (a causal LM sharing the dLLM student's tokenizer).
    The SFT trajectory, θb and Δc profiling run on it, as in the paper; ``model.path`` is the dLLM student."""


@dataclass
class DataConfig:
    train: str = ""
    """Teacher traces: JSONL / Parquet / HF dataset folder with ``prompt``, ``response``, ``answer``."""
    heldout: str = ""
    """Held-out prompts with gold answers for the final evaluation (responses not needed)."""
    format: str = "auto"
    """File format for ``t3s.data.load_records``: ``auto`` (from the extension), ``jsonl``, ``json``,
    ``parquet``, ``hf``."""
    adapter: str = "auto"
    """Record adapter: ``auto``, ``canonical``, ``messages``, ``s1k``, ``s1k-1.1``, ``areal-boba``,
    ``openthoughts``."""
    max_length: int = 4096
    """Longest tokenized example (prompt + response)."""
    truncation: str = "error"
    """What to do with a longer example: ``error``, ``right`` (drop the end) or ``left``."""
    max_examples: int | None = None
    """Use only the first N training records (None = all)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"
    """``cosine`` (to ``min_lr_ratio * lr``) or ``constant``, both after a linear warm-up."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    """Gradient clipping by global norm; None disables it."""


@dataclass
class TrainConfig:
    steps: int = 50
    """Optimizer steps per run (the paper: 50)."""
    batch_size: int = 64
    """Examples per optimizer step, over all ranks (the paper: 64)."""
    micro_batch_size: int = 8
    """Examples per forward/backward on one rank; gradient accumulation covers the rest."""
    epochs_shuffle: bool = True
    """Reshuffle the data at every pass over it (deterministic given ``seed``)."""
    seed: int = 0
    autocast: str = "none"
    """``none`` or ``bf16`` (torch.autocast around forward and loss)."""
    gradient_checkpointing: bool = False
    packing: bool = False
    """Pack each micro-batch into rows of up to ``data.max_length`` tokens: per-document position ids and a
    block-diagonal causal mask (with ``flash_attention_2``: position ids only, varlen attention)."""
    log_every: int = 1
    keep_checkpoints: bool = False
    """Keep a checkpoint at every accuracy evaluation (θb and the final model are always kept)."""
    mode: str = "ar"
    """``ar`` (autoregressive SFT / T3S) or ``dllm`` (block diffusion, ``t3s.dllm``)."""


@dataclass
class GenerationConfig:
    """The generation engine behind training accuracy and held-out evaluation."""

    backend: str = "hf"
    """``hf`` (Hugging Face loop; CPU or one GPU; training accuracy measured inside the training run) or
    ``vllm`` (``pip install 't3s[vllm]'``, GPU: the trajectory saves a checkpoint at every evaluation step and a
    ``trajectory_eval`` stage starts one engine per checkpoint; run that stage without torchrun)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per engine."""
    gpu_memory_utilization: float = 0.9
    """vLLM: share of each GPU's memory the engine may take."""
    max_model_len: int | None = None
    """vLLM: context length of the engine (None = the model's)."""
    dtype: str = "auto"
    """vLLM: weight dtype (``auto``, ``bfloat16``, ``float16``, ``float32``)."""
    engine_kwargs: dict = field(default_factory=dict)
    """vLLM: further ``vllm.LLM(...)`` arguments."""


@dataclass
class AccuracyConfig:
    """Training accuracy: generation on training prompts, answer checked against the gold answer."""

    every: int = 1
    """Evaluate every k optimizer steps (and at step 0)."""
    num_prompts: int | None = 64
    """Subset of training prompts (fixed, seeded); None = all."""
    max_new_tokens: int | None = None
    """None = derived from the traces: the longest training response in tokens, capped by the model's context
    minus the longest prompt (an answer after the cut is never seen). The value used is recorded."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples (with ``top_p``), ``num_samples`` completions per prompt."""
    top_p: float = 1.0
    num_samples: int = 1
    """Completions per prompt; the accuracy is their mean (needs temperature > 0 when > 1)."""
    sampling_seed: int = 0
    max_truncated_fraction: float = 0.5
    """Fail (with what to change) when more than this share of the completions at θ0, or on average over the
    trajectory, hit ``max_new_tokens`` or carry no extractable answer: such a curve cannot locate θb."""
    batch_size: int = 32
    verifier: str = "auto"
    """``auto`` (math-verify if installed, else exact/numeric), ``exact``, ``numeric``, or ``module:function``."""
    curve: str | None = None
    """A precomputed ``{step: accuracy}`` JSON that replaces generation for the SFT trajectory."""
    track_variants: bool = True
    """Also log training accuracy while training the variants (for the SFT-vs-T3S plots)."""


@dataclass
class BottleneckConfig:
    method: str = "argmin"
    """``argmin`` (the paper's Eq. 1: lowest training accuracy over the whole trajectory; ties: earliest),
    ``online`` (new minimum, then ``patience`` evaluations without a lower one; may stop early) or ``fixed``
    (T3S-simple: the checkpoint at ``step``, paper: 10)."""
    step: int = 10
    patience: int = 3
    min_delta: float = 0.0
    """A value counts as a new minimum only if it is lower by more than this."""
    stop_early: bool = True
    """``online``: stop the SFT trajectory once the bottleneck is confirmed; ``fixed``: stop at ``step``.
    (``argmin`` always runs the whole trajectory; its final checkpoint is RRT's θf.)"""
    min_step: int = 0
    """Never pick a checkpoint before this step. 0 (default) is the paper's Eq. 1, which ranges over θ0 and every
    checkpoint; a larger value leaves θ0 (and the first steps) out, a departure from Eq. 1 that picks a later
    checkpoint even when the curve never falls below θ0's accuracy."""
    on_no_shock: str = "error"
    """No Imitation Shock (no checkpoint less accurate than θ0, so by Eq. 1 θb = θ0 and T3S equals SFT):
    ``error`` (stop after the trajectory, before profiling, saying so) or ``proceed`` (run anyway; the report
    says T3S equals SFT). A drop within the accuracy's binomial noise only warns."""
    on_bad_curve: str = "error"
    """A curve that cannot locate θb (flat, or measured on mostly truncated / answerless completions): ``error``
    (stop with what to change) or ``warn`` (take θb anyway; the problem is recorded in bottleneck.json and shown
    at the top of the report)."""


@dataclass
class SelectConfig:
    threshold: float = 0.0
    """Anchor rule ``Δc > threshold`` (the paper: 0)."""
    quantile: float | None = None
    """Put the anchor cut at this quantile of Δc instead of at ``threshold`` (0.8 masks the top 20 %)."""
    always_train_eos: bool = True
    """Never mask end-of-sequence / end-of-turn tokens (they stay in the loss whatever their Δc). The paper is
    silent on them; with the plain Δc > 0 rule a student whose EOS confidence rose stops learning to stop. False
    = the bare rule. Their masked share is in the selection stats and the report either way."""
    end_token_ids: list[int] = field(default_factory=list)
    """Extra end-of-turn ids (e.g. ``<|im_end|>``) beyond the tokenizer's / model's EOS."""
    tau: float = 0.2
    """dLLM targets ``Δc < -tau`` (the paper: 0.2, about 5 % of tokens)."""
    seed: int = 0
    """Seed of the random-mask control."""
    ranking: str = "global"
    """Where the ``static_*`` / ``random`` baselines rank tokens: ``global`` (over the whole dataset) or
    ``per_sequence`` (each sequence masks as many as T3S masks in it). Either way they mask exactly as many
    tokens as T3S after the end-token exemption. The paper does not say (Appendix K: "the same token
    fraction"); global is this library's choice."""


@dataclass
class EvalConfig:
    num_prompts: int | None = None
    """Held-out prompts to evaluate (None = all)."""
    max_new_tokens: int | None = None
    """None = derived like ``accuracy.max_new_tokens`` (longest training response, capped by the context)."""
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    """Completions per prompt (the paper reports the mean of 16 sampled runs)."""
    sampling_seed: int = 0
    batch_size: int = 32
    style_patterns: dict = field(default_factory=dict)
    """``{name: regex}``: the report shows the share of completions matching each (e.g. which teacher's
    style the student writes in)."""


@dataclass
class DiagnosticsConfig:
    delta_prob: bool = True
    """Mean Δ-probability of anchors vs other tokens at every accuracy evaluation of the SFT / T3S runs."""
    grad_stats: bool = True
    """Anchor/other gradient-norm ratio and cosine at every accuracy evaluation of the SFT run."""
    loss_transfer: bool = False
    """The 4x4 loss-transfer matrix (four extra training runs, paper Appendix L)."""
    loss_transfer_steps: int | None = None
    """Steps for each loss-transfer run (None = ``train.steps``)."""
    num_examples: int = 32
    """Training examples used for the per-checkpoint diagnostics."""
    anchor_intervention: bool = False
    """Paper Fig. 5: at every evaluation of the SFT run, one update on anchor tokens only (and one on the other
    tokens only) from a copy of the current weights; records the loss change of each group."""
    intervention_lr: float | None = None
    """Step size of that update (a first Adam step, ``lr · sign(g)``); None = ``optim.lr``."""


@dataclass
class DistributedConfig:
    strategy: str = "fsdp2"
    """Under torchrun: ``fsdp2`` (``fully_shard``) or ``ddp``. Ignored for a single process."""
    backend: str = "auto"
    """``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``."""


@dataclass
class RuntimeConfig:
    """How a run executes on this machine (recorded in ``provenance.json``; never invalidates finished stages)."""

    threads: int = 2
    """CPU threads for torch / OpenMP / MKL, pinned for the whole run (with dynamic threading off). Results on
    CPU are bit-identical only at the same thread count (and versions, BLAS, CPU type); a fixed default keeps a
    run's numbers independent of the machine's core count and load. 0 = torch's default (all cores)."""
    interop_threads: int = 1
    """torch inter-op threads (parallelism between independent ops); 0 = torch's default."""
    deterministic: bool = True
    """``torch.use_deterministic_algorithms`` (warn-only: an op with no deterministic kernel warns, never fails),
    cuDNN deterministic without benchmarking, and a fixed cuBLAS workspace."""
    portable: bool = False
    """Pin every instruction-set choice that changes float results (PyTorch's own kernels, MKL, oneDNN) to AVX2,
    which every current x86-64 server CPU has, so the run gives the same bytes on any of them, not only on the CPU
    type that wrote them. Set by the ``t3s`` command before torch loads (it re-starts itself if torch was already
    loaded); on by default for ``t3s demo``. Costs some speed on an AVX-512 CPU (README). Covers x86-64 CPUs with
    torch's MKL; not ARM, another BLAS or a GPU."""
    verify: str = "stat"
    """Checking finished stages' outputs on a re-run: ``stat`` re-hashes a file only when its size or modification
    time differs from the last hash taken (a size change is always caught); ``sha256`` re-reads every file."""
    dist_timeout_s: float = 1800.0
    """Under ``torchrun``: seconds a rank waits in a collective for the others before it exits with an error
    (torch's default). A rank that dies closes its connections and the others exit at once, naming it; this
    bounds the wait for one that hangs. Must exceed the longest rank-0-only work (evaluation, the report)."""


@dataclass
class Config:
    run_dir: str = "runs/t3s"
    variants: list[str] = field(default_factory=lambda: ["sft", "t3s", "neg_t3s", "static_high_conf",
                                                          "static_low_conf", "random", "rrt"])
    """Variants to train and evaluate (θ0 is always evaluated as ``base``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dllm: dict = field(default_factory=dict)
    """Options of ``t3s.dllm.DLLMConfig`` when ``train.mode=dllm`` (``mask_token_id``, ``block_size``,
    ``weight_mode`` (default ``uniform``: the paper's Eq. 10, an unweighted sum over the union mask), ...)."""
    demo: dict = field(default_factory=dict)
    """Options passed through to ``t3s.demo.prepare_demo`` by ``t3s demo``."""
    paper_reference: str | None = None
    """Name of a paper setting whose published numbers the report may show next to the run's (e.g.
    ``boba200_r1``); None shows none. The report labels them as the paper's, never as the run's."""


# ----------------------------------------------------------------------------------------------------------
# Loading, overriding, validating


_CHOICES = {
    "model.dtype": ("fp32", "bf16"),
    "data.truncation": ("error", "right", "left"),
    "optim.schedule": ("cosine", "constant"),
    "train.autocast": ("none", "bf16"),
    "train.mode": ("ar", "dllm"),
    "bottleneck.method": ("argmin", "online", "fixed"),
    "generation.backend": ("hf", "vllm"),
    "bottleneck.on_bad_curve": ("error", "warn"),
    "bottleneck.on_no_shock": ("error", "proceed"),
    "select.ranking": ("global", "per_sequence"),
    "distributed.strategy": ("fsdp2", "ddp"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "runtime.verify": ("stat", "sha256"),
}


def _fields(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, _ in _fields(obj).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str, root: Config) -> ConfigError:
    known = _all_keys(root)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    if not close:  # also match on the last component (``lr`` -> ``optim.lr``)
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] in difflib.get_close_matches(last, [
            k2.rsplit(".", 1)[-1] for k2 in known], n=3, cutoff=0.6)][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or the command line) to the annotated type ``tp``, or raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads ``1e-5`` as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _set(root: Config, key: str, value: Any) -> None:
    obj: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            raise _unknown(key, root)
        if i == len(parts) - 1:
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: is a section; set its keys ({key}.<name>=...) or give a mapping")
                for k, v in value.items():
                    _set(root, f"{key}.{k}", v)
                return
            if isinstance(current, dict) and fields[part] is dict and len(parts) == i + 1:
                setattr(obj, part, _coerce(key, value, dict))
                return
            setattr(obj, part, _coerce(key, value, fields[part]))
            return
        nxt = getattr(obj, part)
        if isinstance(nxt, dict):  # free-form pass-through section (dllm.*, demo.*)
            sub = nxt
            for p in parts[i + 1 : -1]:
                sub = sub.setdefault(p, {})
            sub[parts[-1]] = value
            return
        if not dataclasses.is_dataclass(nxt):
            raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is not a section")
        obj = nxt


def apply_mapping(cfg: Config, mapping: dict, prefix: str = "") -> Config:
    """Apply a (nested) mapping from a YAML file onto ``cfg`` in place."""
    if mapping is None:
        return cfg
    if not isinstance(mapping, dict):
        raise ConfigError(f"config {prefix or 'file'} must be a mapping, got {type(mapping).__name__}")
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        target = _lookup(cfg, key)
        if dataclasses.is_dataclass(target) and isinstance(v, dict):
            apply_mapping(cfg, v, key + ".")
        else:
            _set(cfg, key, v)
    return cfg


def _lookup(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in _fields(obj):
            raise _unknown(key, cfg)
        obj = getattr(obj, part)
    return obj


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[x,y]"]`` -> ``[("a.b", 1), ("c", ["x", "y"])]`` (values parsed as YAML)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: Config | None = None) -> Config:
    """Defaults <- YAML file (if any) <- ``key=value`` overrides, then validated."""
    cfg = base if base is not None else Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        apply_mapping(cfg, mapping or {})
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> Config:
    """Check values that types alone cannot (choices, ranges, consistency)."""
    for key, choices in _CHOICES.items():
        value = _lookup(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"variants: unknown {', '.join(map(repr, bad))}; choose from {', '.join(VARIANTS)}")
    if "rrt" in cfg.variants and "sft" not in cfg.variants and trajectory_stops_early(cfg):
        raise ConfigError("variants: rrt needs θf, the final SFT model: the trajectory stops early with "
                          f"bottleneck.method={cfg.bottleneck.method} and stop_early, so add sft to variants")
    for section in ("accuracy", "eval"):
        sec = getattr(cfg, section)
        if sec.temperature < 0 or not 0 < sec.top_p <= 1:
            raise ConfigError(f"{section}.temperature must be >= 0 and {section}.top_p in (0, 1]")
        if sec.temperature == 0 and sec.num_samples > 1:
            raise ConfigError(f"{section}.num_samples={sec.num_samples} with greedy decoding repeats one completion; "
                              f"set {section}.temperature > 0")
    if not 0 <= cfg.accuracy.max_truncated_fraction <= 1:
        raise ConfigError("accuracy.max_truncated_fraction must be in [0, 1]")

    positive = {"train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
                "train.micro_batch_size": cfg.train.micro_batch_size, "accuracy.every": cfg.accuracy.every,
                "accuracy.max_new_tokens": cfg.accuracy.max_new_tokens or 1, "accuracy.batch_size":
                cfg.accuracy.batch_size, "eval.max_new_tokens": cfg.eval.max_new_tokens or 1,
                "eval.batch_size": cfg.eval.batch_size, "data.max_length": cfg.data.max_length,
                "train.log_every": cfg.train.log_every, "accuracy.num_samples": cfg.accuracy.num_samples,
                "eval.num_samples": cfg.eval.num_samples,
                "generation.tensor_parallel_size": cfg.generation.tensor_parallel_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.warmup_steps < 0 or cfg.bottleneck.patience < 1 or cfg.bottleneck.step < 1:
        raise ConfigError("optim.warmup_steps must be >= 0, bottleneck.patience and bottleneck.step >= 1")
    if cfg.bottleneck.min_step < 0:
        raise ConfigError(f"bottleneck.min_step must be >= 0 (0 = θ0 included, Eq. 1), got {cfg.bottleneck.min_step}")
    if cfg.bottleneck.method == "fixed" and cfg.bottleneck.step > cfg.train.steps:
        raise ConfigError(f"bottleneck.step={cfg.bottleneck.step} is after the last step (train.steps="
                          f"{cfg.train.steps})")
    if not cfg.runtime.dist_timeout_s > 0:
        raise ConfigError(f"runtime.dist_timeout_s: must be > 0 seconds, got {cfg.runtime.dist_timeout_s}")
    if cfg.runtime.threads < 0 or cfg.runtime.interop_threads < 0:
        raise ConfigError(f"runtime.threads / runtime.interop_threads: must be >= 0 (0 = torch's default), got "
                          f"{cfg.runtime.threads} / {cfg.runtime.interop_threads}")
    if cfg.train.batch_size % cfg.train.micro_batch_size:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({cfg.train.micro_batch_size})")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_path(name: str) -> Path:
    """A config shipped with the package (``default``, ``demo``)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no packaged config {name!r} (looked for {path})")
    return path


def documented_yaml(cfg: Config | None = None) -> str:
    """Every key with its value and its docstring as a comment (``t3s/configs/default.yaml`` is this text)."""
    import ast
    import textwrap

    docs: dict[tuple[str, str], str] = {}
    for node in ast.parse(Path(__file__).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            for st, nxt in zip(node.body, [*node.body[1:], None], strict=True):
                if (isinstance(st, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                        and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                    docs[(node.name, st.target.id)] = " ".join(nxt.value.value.split())
    lines = ["# t3s: every config key with its default. A run's config names only what it changes.",
             "# (Generated by t3s.config.documented_yaml(); a test keeps it in sync with the dataclasses.)",
             "#",
             "#   t3s run my.yaml key=value ...     e.g. optim.lr=5e-4 train.steps=30 variants=[sft,t3s]",
             "#   torchrun --nproc-per-node 8 -m t3s.cli run my.yaml     (FSDP2; distributed.strategy=ddp for DDP)",
             "#",
             "# An unknown key is an error. Paths are local; nothing is downloaded.", ""]

    def emit(obj: Any, depth: int) -> None:
        pad = "  " * depth
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            doc = docs.get((type(obj).__name__, f.name))
            if doc:
                lines.extend(f"{pad}# {line}" for line in textwrap.wrap(doc, 110 - len(pad)))
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, depth + 1)
                lines.append("")
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
                text = text.removesuffix("...").strip()
                lines.append(f"{pad}{f.name}: {text}".rstrip())

    from t3s.choices import choices_comment

    emit(cfg or Config(), 0)
    lines += ["", *choices_comment(cfg or Config())]
    return "\n".join(lines).rstrip() + "\n"
