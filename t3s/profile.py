"""Δc_t profiling: per-token confidence ``c_t = log p(y_t | y_<t, x)`` of a causal LM over teacher traces.

Only response tokens are scored. The log-probs come from the model trunk's hidden states and the LM-head weight
through the fused :func:`t3s_kernels.linear_ce.api.token_logprobs`, so no ``[tokens x vocab]`` logits tensor is
ever built (a 32768-token trace with a 151936-token vocabulary would need 20 GB for that alone in fp32).

A profile is a *store*, a folder with

* ``scores.parquet`` — one row per example (columns in :data:`SCORE_COLUMNS`):
  ``index`` (int64, position in the input), ``id`` (string), ``input_ids`` (list<int32>, the whole tokenized
  sequence, prompt included, so a trainer can check it tokenized the same way), ``response_start`` (int32),
  ``positions`` (list<int32>, indices into ``input_ids`` of the scored tokens: every position whose label is not
  -100), ``token_ids`` (list<int32>, ``input_ids[positions]``), ``logprob`` (list<float32>, ``c_t``), and
  ``entropy`` (list<float32>) when asked for;
* ``provenance.json`` — what produced it (see :func:`provenance`): model / tokenizer / chat-template hashes,
  dtype, device, settings, counts. It is written last: a store is complete exactly when it exists.

Profiling is resumable: examples are split into *parts* (longest first, a fixed plan that does not depend on the
number of ranks); each finished part is written atomically to ``parts/part-NNNNN.parquet`` and skipped by a
re-run with the same inputs; the parts are merged into ``scores.parquet`` at the end. Under ``torchrun`` the ranks
take parts round-robin and rank 0 merges them (``out_dir`` must be on a filesystem every rank can see).

:func:`delta_confidence` subtracts two stores (θb minus θ0) into a Δc store; tokenization that differs between
them is an error, never a silent misalignment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from t3s import distributed as dist_utils
from t3s.data import (
    IGNORE_INDEX,
    Record,
    TokenizedExample,
    length_buckets,
    load_records,
    tokenize_records,
)
from t3s.io import read_json, write_json_atomic, write_parquet_atomic
from t3s.scoring import LMHead, lm_head, score_batch, trunk_hidden_states  # noqa: F401 (public here too)

STORE_FORMAT = "t3s.scores/1"
DELTA_FORMAT = "t3s.delta/1"
SCORES_FILE = "scores.parquet"
DELTA_FILE = "delta.parquet"
PROVENANCE_FILE = "provenance.json"
PARTS_DIR = "parts"

SCORE_COLUMNS = ("index", "id", "input_ids", "response_start", "positions", "token_ids", "logprob")
DELTA_COLUMNS = (
    "index", "id", "input_ids", "response_start", "positions", "token_ids",
    "logprob_base", "logprob_bottleneck", "delta_c",
)

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


# --------------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------------


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@torch.no_grad()
def model_fingerprint(model: Any, samples_per_tensor: int = 4096) -> str:
    """A cheap content hash of a model's weights: every tensor's name, shape and dtype plus a strided sample of
    up to ``samples_per_tensor`` of its values.

    Hashing all weights of an 8B model would read 16 GB; the sample tells two checkpoints of one fine-tuning run
    apart (every trained tensor moves) at a cost of milliseconds.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].to("cpu", torch.float64).numpy()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary, merges, normalisation and special tokens (not of its chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return _sha(body + "\n" + specials)


def chat_template_hash(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return _sha(template)


def examples_fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """Hash of the tokenized inputs (ids, token ids, label layout): equal exactly when the inputs are equal."""
    h = hashlib.sha256()
    for example in examples:
        h.update(example.id.encode() + b"\0")
        h.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(example.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list | tuple):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def provenance(model: Any, tokenizer: Any, examples: Sequence[TokenizedExample], settings: dict) -> dict:
    """The provenance record of a store (also the fingerprint that decides whether a re-run may resume)."""
    param = next(iter(model.parameters()))
    return {
        "format": STORE_FORMAT,
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        "model_class": type(model).__name__,
        "model_hash": model_fingerprint(model),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "chat_template_hash": chat_template_hash(tokenizer),
        "examples_hash": examples_fingerprint(examples),
        "eos_token_ids": eos_token_ids(model, tokenizer),
        "dtype": str(param.dtype).replace("torch.", ""),
        "num_examples": len(examples),
        "num_scored_tokens": int(sum(e.num_response_tokens for e in examples)),
        "settings": settings,
    }


_FINGERPRINT_KEYS = ("model_hash", "tokenizer_hash", "chat_template_hash", "examples_hash", "dtype", "settings")


def _same_run(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in _FINGERPRINT_KEYS)


# --------------------------------------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------------------------------------


@dataclass
class Store:
    """A loaded store: its Parquet table (one row per example) and its provenance."""

    path: Path | None
    table: pa.Table
    provenance: dict

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    def column(self, name: str, row: int) -> np.ndarray:
        """One example's list column as a (writable) numpy array."""
        return np.array(self.table.column(name)[row].values.to_numpy(zero_copy_only=False))

    def flat(self, name: str) -> np.ndarray:
        """A list column flattened over all examples (row order), as a (writable) numpy array."""
        return np.array(self.table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False))

    def lengths(self, name: str = "positions") -> np.ndarray:
        return np.asarray([len(v) for v in self.table.column(name).to_pylist()]) if len(self) else np.zeros(0, int)


# The columns that identify an example and its scored tokens: the first columns of a profile store and of the Δc
# store built from two of them (which copies them from the base profile).
_RECORD_FIELDS = (
    pa.field("index", pa.int64()),
    pa.field("id", pa.string()),
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("response_start", pa.int32()),
    pa.field("positions", pa.list_(pa.int32())),
    pa.field("token_ids", pa.list_(pa.int32())),
)


def _rows_to_table(rows: list[dict], with_entropy: bool) -> pa.Table:
    fields = [*_RECORD_FIELDS, pa.field("logprob", pa.list_(pa.float32()))]
    if with_entropy:
        fields.append(pa.field("entropy", pa.list_(pa.float32())))
    schema = pa.schema(fields)
    return pa.Table.from_pylist(rows, schema=schema)


def _load_table(store: str | Path, filename: str, kind: str) -> Store:
    path = Path(store)
    prov_path = path / PROVENANCE_FILE
    if not prov_path.exists():
        raise FileNotFoundError(f"{path} is not a complete {kind} store: {PROVENANCE_FILE} is missing")
    table = pq.read_table(path / filename)
    return Store(path=path, table=table, provenance=read_json(prov_path))


def load_scores(store: str | Path) -> Store:
    """Load a profile store written by :func:`profile_confidence` (columns :data:`SCORE_COLUMNS`)."""
    return _load_table(store, SCORES_FILE, "profile")


def load_delta(store: str | Path) -> Store:
    """Load a Δc store written by :func:`delta_confidence` (columns :data:`DELTA_COLUMNS`)."""
    return _load_table(store, DELTA_FILE, "delta")


# --------------------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def load_model_and_tokenizer(
    model: Any, tokenizer: Any = None, *, dtype: str | torch.dtype | None = None, device: Any = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Accept a local model folder or an in-memory model (and likewise the tokenizer; default: the model folder).

    Loading never downloads (``local_files_only=True``). From a folder, the default dtype is bf16 on CUDA and
    fp32 on CPU; an in-memory model keeps its dtype, and a different ``dtype`` is an error rather than a silent
    in-place cast of the caller's model.
    """
    want = _resolve_dtype(dtype)
    if isinstance(model, str | Path):
        from transformers import AutoModelForCausalLM

        target = torch.device(device) if device is not None else dist_utils.device()
        if want is None:
            want = torch.bfloat16 if target.type == "cuda" else torch.float32
        path = str(model)
        from t3s.packing import resolve_attn_implementation

        attn = resolve_attn_implementation(attn_implementation, target)
        extra = {"attn_implementation": attn} if attn else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=want, local_files_only=True, **extra).to(target)
        if tokenizer is None:
            tokenizer = path
    else:
        current = next(iter(model.parameters())).dtype
        if want is not None and want != current:
            raise ValueError(f"dtype={dtype!r} but the in-memory model is {current}; cast it yourself or pass a path")
        if device is not None:
            model = model.to(device)
    if tokenizer is None:
        raise ValueError("tokenizer is required with an in-memory model")
    if isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return model, tokenizer


def _as_examples(
    data: Any, tokenizer: Any, *, max_tokens: int, truncation: str, progress: bool
) -> list[TokenizedExample]:
    if isinstance(data, str | Path):
        data = load_records(data, require_answer=False)
    data = list(data)
    if not data:
        raise ValueError("records_or_examples is empty: nothing to profile")
    if all(isinstance(d, TokenizedExample) for d in data):
        return data
    if all(isinstance(d, Record) for d in data):
        return tokenize_records(data, tokenizer, max_tokens=max_tokens, truncation=truncation, progress=progress)
    raise TypeError("records_or_examples must be a dataset path, a list of Records or a list of TokenizedExamples")


def _plan_parts(lengths: Sequence[int], part_tokens: int) -> list[list[int]]:
    """Split example indices (longest first) into parts of about ``part_tokens`` tokens each."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    parts: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in order:
        if current and size + lengths[i] > part_tokens:
            parts.append(current)
            current, size = [], 0
        current.append(i)
        size += lengths[i]
    if current:
        parts.append(current)
    return parts


def _score_part(
    model: Any,
    examples: Sequence[TokenizedExample],
    indices: Sequence[int],
    *,
    batch_tokens: int,
    pad_id: int,
    return_entropy: bool,
    on_tokens=None,
    packing: bool = False,
) -> list[dict]:
    device = next(iter(model.parameters())).device
    rows = []
    lengths = [len(examples[i]) for i in indices]
    for bucket in length_buckets(lengths, batch_tokens):
        batch = [examples[indices[b]] for b in bucket]
        if packing:
            from t3s.packing import score_packed

            scored = score_packed(model, batch, batch_tokens=batch_tokens, return_entropy=return_entropy)
            width = max(len(e) for e in batch)
            logprob = np.stack([np.pad(lp, (0, width - lp.size)) for lp, _ in scored])
            entropy = np.stack([np.pad(en, (0, width - en.size)) for _, en in scored]) if return_entropy else None
            rows += _score_rows(batch, bucket, indices, logprob, entropy)
            if on_tokens is not None:
                on_tokens(sum(len(e) for e in batch))
            continue
        width = max(len(e) for e in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, example in enumerate(batch):
            n = len(example)
            input_ids[r, :n] = torch.tensor(example.input_ids)
            labels[r, :n] = torch.tensor(example.labels)
            attention_mask[r, :n] = 1
        logprob, entropy = score_batch(  # labels stay on the host: score_batch indexes the scored rows there
            model, input_ids.to(device), labels, attention_mask.to(device), return_entropy=return_entropy
        )
        logprob = logprob.cpu().numpy()
        entropy = entropy.cpu().numpy() if entropy is not None else None
        rows += _score_rows(batch, bucket, indices, logprob, entropy)
        if on_tokens is not None:
            on_tokens(sum(len(e) for e in batch))
    return rows


def _score_rows(batch, bucket, indices, logprob: np.ndarray, entropy: np.ndarray | None) -> list[dict]:
    rows = []
    for r, (b, example) in enumerate(zip(bucket, batch, strict=True)):
        label_row = np.asarray(example.labels)
        positions = np.nonzero(label_row != IGNORE_INDEX)[0]
        row = {
            "index": int(indices[b]),
            "id": example.id,
            "input_ids": example.input_ids,
            "response_start": int(example.response_start),
            "positions": positions.astype(np.int32).tolist(),
            "token_ids": np.asarray(example.input_ids)[positions].astype(np.int32).tolist(),
            "logprob": logprob[r, positions].astype(np.float32).tolist(),
        }
        if entropy is not None:
            row["entropy"] = entropy[r, positions].astype(np.float32).tolist()
        rows.append(row)
    return rows


def _score_my_parts(model: Any, tokenizer: Any, examples: list, parts: list[list[int]], parts_dir: Path, *,
                    batch_tokens: int, return_entropy: bool, progress: bool, packing: bool, desc: str) -> None:
    """Score this rank's unfinished parts, writing each as one parquet file (the model's mode is restored)."""
    mine = list(range(len(parts)))[dist_utils.rank() :: dist_utils.world_size()]
    todo = [p for p in mine if not (parts_dir / f"part-{p:05d}.parquet").exists()]
    bar = None
    if progress and dist_utils.is_main():
        from tqdm.auto import tqdm

        total = sum(len(examples[i]) for p in todo for i in parts[p])
        bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    was_training = model.training
    model.eval()
    try:
        for p in todo:
            rows = _score_part(
                model, examples, parts[p], batch_tokens=batch_tokens, pad_id=pad_id,
                return_entropy=return_entropy, on_tokens=bar.update if bar else None, packing=packing,
            )
            write_parquet_atomic(parts_dir / f"part-{p:05d}.parquet", _rows_to_table(rows, return_entropy))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()


def _merge_parts(model: Any, parts_dir: Path, num_parts: int, *, out_dir: Path, prov: dict) -> None:
    """Rank 0: join every part into the store, then write its provenance, which marks it complete."""
    missing = [p for p in range(num_parts) if not (parts_dir / f"part-{p:05d}.parquet").exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} profile parts are missing from {parts_dir} after all ranks finished; with several "
            "nodes, out_dir must be on a filesystem that every rank can see"
        )
    tables = [pq.read_table(parts_dir / f"part-{p:05d}.parquet") for p in range(num_parts)]
    table = pa.concat_tables(tables).sort_by("index")
    write_parquet_atomic(out_dir / SCORES_FILE, table)
    prov.update(
        world_size=dist_utils.world_size(),
        device=str(next(iter(model.parameters())).device),
    )  # no timestamps: the same model and data give the same bytes, so later stages are not re-run
    write_json_atomic(out_dir / PROVENANCE_FILE, prov)  # last: marks the store complete
    shutil.rmtree(parts_dir, ignore_errors=True)


def profile_confidence(
    model: Any,
    tokenizer: Any,
    records_or_examples: Any,
    out_dir: str | Path,
    *,
    max_tokens: int = 32768,
    truncation: str = "error",
    batch_tokens: int = 32768,
    part_tokens: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: Any = None,
    return_entropy: bool = False,
    resume: bool = True,
    progress: bool = True,
    packing: bool = False,
    attn_implementation: str | None = None,
) -> Path:
    """Score every response token of every example with ``c_t = log p(y_t | y_<t, x)`` and write a store.

    Args:
        model: a local Hugging Face model folder or an in-memory causal LM.
        tokenizer: a tokenizer, a local tokenizer folder, or None (= the model folder).
        records_or_examples: a dataset path (read with :func:`t3s.data.load_records`), Records, or already
            tokenized :class:`~t3s.data.TokenizedExample` objects (use these to score exactly what you train on).
        out_dir: the store folder (``scores.parquet`` + ``provenance.json``).
        max_tokens, truncation: tokenization limits when given records (see :func:`t3s.data.tokenize_record`).
        batch_tokens: padded tokens per forward pass (``batch size x longest sequence``); one longer sequence
            runs alone. Sequences are bucketed by length, longest first.
        part_tokens: tokens per resumable part (default ``4 * batch_tokens``); a crash loses at most one part
            per rank.
        dtype: weights dtype when loading from a folder (``"bf16"``, ``"fp32"``, ...); recorded in provenance.
        device: where to run (default: ``cuda:LOCAL_RANK`` if available, else CPU for a folder; the in-memory
            model's device otherwise).
        return_entropy: also store the predictive entropy per token (column ``entropy``).
        resume: reuse finished parts and a finished store made from the same model, tokenizer, data and
            settings; with ``False`` everything is recomputed.
        progress: show a token progress bar (rank 0).
        packing: score packed rows (documents concatenated, ``position_ids`` restarting per document, no padding;
            :func:`t3s.packing.score_packed`) of up to ``batch_tokens`` tokens instead of padded rows.
        attn_implementation: when loading from a folder: ``"auto"`` (flash_attention_2 with flash-attn on CUDA,
            else sdpa), ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``; None = the library default.

    Returns:
        The store folder. Under ``torchrun`` every rank returns it after rank 0 has merged the parts.
    """
    out_dir = Path(out_dir)
    dist_utils.init_distributed()
    model, tokenizer = load_model_and_tokenizer(model, tokenizer, dtype=dtype, device=device,
                                                attn_implementation=attn_implementation)
    examples = _as_examples(
        records_or_examples, tokenizer, max_tokens=max_tokens, truncation=truncation,
        progress=progress and dist_utils.is_main(),
    )
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    part_tokens = part_tokens or 4 * batch_tokens
    settings = {"max_tokens": max_tokens, "truncation": truncation, "return_entropy": return_entropy}
    if packing:
        settings["packing"] = True
    prov = provenance(model, tokenizer, examples, settings)
    prov_path = out_dir / PROVENANCE_FILE

    # Finished store from the same run: nothing to do (every rank decides the same way).
    if resume and prov_path.exists() and _same_run(read_json(prov_path), prov):
        dist_utils.barrier()
        return out_dir

    parts_dir = out_dir / PARTS_DIR
    plan_path = parts_dir / "plan.json"
    parts = _plan_parts([len(e) for e in examples], part_tokens)
    plan = {"fingerprint": {k: prov[k] for k in _FINGERPRINT_KEYS}, "parts": parts}
    if dist_utils.is_main():
        # The store is rewritten below; drop its "complete" flag first so a crash cannot leave old provenance
        # next to new scores.
        prov_path.unlink(missing_ok=True)
        stale = plan_path.exists() and (not resume or read_json(plan_path) != json.loads(json.dumps(plan)))
        if stale or (parts_dir.exists() and not plan_path.exists()):
            shutil.rmtree(parts_dir)
        if not plan_path.exists():
            write_json_atomic(plan_path, plan)
    dist_utils.barrier()

    _score_my_parts(model, tokenizer, examples, parts, parts_dir, batch_tokens=batch_tokens,
                    return_entropy=return_entropy, progress=progress, packing=packing, desc=f"profile {out_dir.name}")
    dist_utils.barrier()

    if dist_utils.is_main():
        _merge_parts(model, parts_dir, len(parts), out_dir=out_dir, prov=prov)
    dist_utils.barrier()
    return out_dir


# --------------------------------------------------------------------------------------------------------
# Δc_t
# --------------------------------------------------------------------------------------------------------


def _as_store(store: Any, loader) -> Store:
    return store if isinstance(store, Store) else loader(store)


def delta_confidence(store_base: Any, store_bottleneck: Any, out: str | Path | None = None) -> Store:
    """``Δc_t = c_t(θb) − c_t(θ0)`` for every scored token of two profile stores.

    Args:
        store_base: the profile of the base model θ0 (a store folder or a loaded :class:`Store`).
        store_bottleneck: the profile of the bottleneck checkpoint θb, over the same examples.
        out: if given, write a Δc store there (``delta.parquet`` + ``provenance.json``).

    Returns:
        A :class:`Store` with columns :data:`DELTA_COLUMNS` (one row per example, lists aligned with
        ``positions``).

    Raises:
        ValueError: the stores differ in examples or tokenization (the message names the example and the first
            differing position); a tokenizer or chat-template hash mismatch is reported as a warning when the
            tokens still agree.
    """
    base = _as_store(store_base, load_scores)
    neck = _as_store(store_bottleneck, load_scores)
    for key in ("tokenizer_hash", "chat_template_hash"):
        if base.provenance.get(key) != neck.provenance.get(key):
            warnings.warn(f"the two stores were made with a different {key.replace('_', ' ')}", stacklevel=2)
    base_ids, neck_ids = base.ids, neck.ids
    if sorted(base_ids) != sorted(neck_ids):
        only_base = sorted(set(base_ids) - set(neck_ids))[:5]
        only_neck = sorted(set(neck_ids) - set(base_ids))[:5]
        raise ValueError(
            f"the stores hold different examples (only in base: {only_base}, only in bottleneck: {only_neck})"
        )
    neck_row = {record_id: r for r, record_id in enumerate(neck_ids)}
    rows = []
    for r, record_id in enumerate(base_ids):
        q = neck_row[record_id]
        for column in ("input_ids", "positions"):
            a, b = base.column(column, r), neck.column(column, q)
            if len(a) != len(b) or not np.array_equal(a, b):
                first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
                raise ValueError(
                    f"tokenization differs between the stores for example {record_id!r}: {column} has "
                    f"{len(a)} vs {len(b)} entries, first difference at entry {first}; profile both checkpoints "
                    "with the same tokenizer, chat template and truncation"
                )
        lp_base, lp_neck = base.column("logprob", r), neck.column("logprob", q)
        rows.append({
            "index": r,
            "id": record_id,
            "input_ids": base.table.column("input_ids")[r].as_py(),
            "response_start": base.table.column("response_start")[r].as_py(),
            "positions": base.table.column("positions")[r].as_py(),
            "token_ids": base.table.column("token_ids")[r].as_py(),
            "logprob_base": lp_base.astype(np.float32).tolist(),
            "logprob_bottleneck": lp_neck.astype(np.float32).tolist(),
            "delta_c": (lp_neck - lp_base).astype(np.float32).tolist(),
        })
    schema = pa.schema([
        *_RECORD_FIELDS,
        pa.field("logprob_base", pa.list_(pa.float32())),
        pa.field("logprob_bottleneck", pa.list_(pa.float32())),
        pa.field("delta_c", pa.list_(pa.float32())),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    delta = table.column("delta_c").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    prov = {
        "format": DELTA_FORMAT,
        "base": base.provenance,
        "bottleneck": neck.provenance,
        "base_store": str(base.path) if base.path else None,
        "bottleneck_store": str(neck.path) if neck.path else None,
        "eos_token_ids": base.provenance.get("eos_token_ids", []),
        "num_examples": len(rows),
        "num_tokens": int(delta.size),
        "anchor_fraction": float((delta > 0).mean()) if delta.size else 0.0,
    }
    result = Store(path=Path(out) if out is not None else None, table=table, provenance=prov)
    if out is not None:
        out = Path(out)
        (out / PROVENANCE_FILE).unlink(missing_ok=True)
        write_parquet_atomic(out / DELTA_FILE, table)
        write_json_atomic(out / PROVENANCE_FILE, prov)
    return result


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def add_profile_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``t3s profile``'s arguments to ``parser`` (so a CLI can mount it as a subcommand)."""
    parser.add_argument("--model", required=True, help="local Hugging Face model folder")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: the model folder)")
    parser.add_argument("--data", required=True, help="dataset: JSONL / JSON / Parquet / saved HF dataset")
    parser.add_argument("--out", required=True, help="store folder to write (scores.parquet + provenance.json)")
    parser.add_argument("--format", default="auto", help="dataset format (auto, jsonl, json, parquet, hf)")
    parser.add_argument("--adapter", default="auto", help="dataset adapter (auto, canonical, messages, s1k, ...)")
    parser.add_argument("--limit", type=int, default=None, help="profile only the first N records")
    parser.add_argument("--max-tokens", type=int, default=32768, help="longest sequence (default 32768)")
    parser.add_argument("--truncation", choices=("error", "left", "right"), default="error")
    parser.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per forward pass")
    parser.add_argument("--part-tokens", type=int, default=None, help="tokens per resumable part")
    parser.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: per rank)")
    parser.add_argument("--entropy", action="store_true", help="also store per-token entropy")
    parser.add_argument("--packing", action="store_true",
                        help="score packed rows (per-document position ids, no padding) of --batch-tokens tokens")
    parser.add_argument("--attn-implementation", default=None,
                        help="auto (flash_attention_2 with flash-attn on CUDA, else sdpa), sdpa, eager, "
                             "flash_attention_2")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="recompute everything")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--delta-from", default=None,
        help="base-model store: after profiling, also write Δc = this profile − base to --delta-out",
    )
    parser.add_argument("--delta-out", default=None, help="Δc store folder (default: <out>/../delta)")
    return parser


def profile_main(args: Sequence[str] | argparse.Namespace | None = None) -> int:
    """``t3s profile``: profile one checkpoint (run twice, θ0 and θb, or pass ``--delta-from`` the θ0 store).

    Accepts an argv list (parsed here) or a Namespace built with :func:`add_profile_arguments`.
    """
    if not isinstance(args, argparse.Namespace):
        parser = add_profile_arguments(argparse.ArgumentParser(prog="t3s profile", description=__doc__.split("\n")[0]))
        args = parser.parse_args(args)
    dist_utils.init_distributed()
    records = load_records(args.data, format=args.format, adapter=args.adapter, limit=args.limit, require_answer=False)
    store = profile_confidence(
        args.model, args.tokenizer, records, args.out,
        max_tokens=args.max_tokens, truncation=args.truncation, batch_tokens=args.batch_tokens,
        part_tokens=args.part_tokens, dtype=args.dtype, device=args.device, return_entropy=args.entropy,
        resume=args.resume, progress=args.progress, packing=args.packing,
        attn_implementation=args.attn_implementation,
    )
    if dist_utils.is_main():
        prov = read_json(Path(store) / PROVENANCE_FILE)
        print(f"profile: {prov['num_examples']} examples, {prov['num_scored_tokens']} tokens -> {store}")
        if args.delta_from:
            delta_out = Path(args.delta_out) if args.delta_out else Path(store).parent / "delta"
            delta = delta_confidence(args.delta_from, store, out=delta_out)
            print(f"delta: anchor fraction (Δc > 0) {delta.provenance['anchor_fraction']:.4f} -> {delta_out}")
    dist_utils.barrier()
    return 0
