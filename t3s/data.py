"""Training data: canonical records, dataset adapters, tokenization with response-only labels, packing.

Every dataset is read into one canonical :class:`Record` ``{id, prompt, response, answer, messages?}``:

* ``prompt`` – the question the student sees;
* ``response`` – the teacher trace the student imitates (the only tokens that get labels);
* ``answer`` – the gold answer used to check training accuracy (a string, or a list of accepted strings);
* ``messages`` – optionally the whole chat (``[{"role", "content"}, ...]``); when present it is what gets
  rendered, and its last assistant message is the response.

Adapters (``adapter=`` in :func:`load_records`; ``"auto"`` picks one from the first record's fields):

============== ========================================================================================
``canonical``  ``prompt`` (aliases ``question``, ``problem``), ``response`` (alias ``completion``),
               ``answer`` (aliases ``gold``, ``solution``, ``solutions``, ``ground_truth``)
``messages``   ``messages`` chat; ``answer`` field or aliases above
``s1k``        s1K: ``question``, ``thinking_trajectories[0]`` + ``attempt``, gold from ``solution``
``s1k-1.1``    s1K-1.1: ``question``, ``deepseek_thinking_trajectory`` + ``deepseek_attempt``, ``solution``
``areal-boba`` AReaL-boba SFT: ``prompt`` (may already be ChatML-rendered), ``answer`` = the full trace;
               gold = the trace's last ``\\boxed{}`` (the SFT traces were kept because they are correct)
``openthoughts`` ``conversations`` (``from``/``value``, ShareGPT) or the ``metadata`` config
               (``problem``, ``deepseek_reasoning`` + ``deepseek_solution``, ``ground_truth_solution``)
============== ========================================================================================

A reasoning trace split in two (thinking + final attempt) is joined with :data:`THINK_TEMPLATE`
(Qwen3's ``<think>`` layout).

Tokenization (:func:`tokenize_record`) renders the chat with the tokenizer's own chat template and puts
labels only on the tokens after the prompt (the response and the template's end-of-turn tokens). A tokenizer
without a chat template falls back to plain ``prompt + response`` (+ EOS) concatenation. Labels use the
Hugging Face convention: unshifted, ``labels[j] = input_ids[j]`` on response positions and ``-100``
elsewhere; ``labels[0]`` is always ``-100`` since nothing predicts the first token.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

IGNORE_INDEX = -100

#: How a trace split into reasoning and final answer is joined (Qwen3 thinking layout).
THINK_TEMPLATE = "<think>\n{thinking}\n</think>\n\n{attempt}"

Truncation = Literal["error", "left", "right"]


# --------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One training example in canonical form (see the module docstring)."""

    id: str
    prompt: str
    response: str
    answer: str | list[str] | None
    messages: list[dict[str, str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def chat(self) -> list[dict[str, str]]:
        """The conversation to render: ``messages`` if given, else one user turn and one assistant turn."""
        if self.messages:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


class DataError(ValueError):
    """A dataset record is unusable; the message names the field and the record."""


def _where(source: str, line: int, record_id: str | None) -> str:
    # JSONL sources count lines (what an editor shows); others count records.
    unit = "line" if source.endswith((".jsonl", ".ndjson")) else "record"
    place = f"{source} {unit} {line}" if source else f"record {line}"
    return f"{place} (id {record_id!r})" if record_id is not None else place


def _first_present(row: Mapping[str, Any], names: Sequence[str]) -> tuple[str | None, Any]:
    for name in names:
        value = row.get(name)
        if value is not None and value != "" and value != []:
            return name, value
    return None, None


def _require(row: Mapping[str, Any], names: Sequence[str], *, what: str, where: str) -> Any:
    _, value = _first_present(row, names)
    if value is None:
        fields = " / ".join(repr(n) for n in names)
        raise DataError(f"{where}: missing {what} field {fields} (fields present: {sorted(row)})")
    return value


_BOXED = "\\boxed"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (balanced braces), or ``None``."""
    start = text.rfind(_BOXED + "{")
    if start < 0:
        return None
    i, depth, begin = start + len(_BOXED), 0, None
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
            if begin is None:
                begin = j + 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:j]
    return None


def _join_thinking(thinking: Any, attempt: Any) -> str:
    if isinstance(thinking, list):  # s1K stores a list of trajectories; the first is the one it trained on
        thinking = thinking[0] if thinking else ""
    if not attempt:
        return str(thinking)
    return THINK_TEMPLATE.format(thinking=str(thinking).strip(), attempt=str(attempt).strip())


def _gold(value: Any) -> str | list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return str(value)


_ANSWER_FIELDS = ("answer", "gold", "gold_answer", "solution", "solutions", "ground_truth", "ground_truth_solution")
_CHATML_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


def _adapt_canonical(row, where):
    prompt = _require(row, ("prompt", "question", "problem", "instruction"), what="prompt", where=where)
    response = _require(row, ("response", "completion", "trace", "output"), what="response", where=where)
    _, answer = _first_present(row, _ANSWER_FIELDS)
    return str(prompt), str(response), (None if answer is None else _gold(answer)), None


def _adapt_messages(row, where):
    messages = _require(row, ("messages",), what="messages", where=where)
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: 'messages' must end with an assistant message (the response)")
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    _, answer = _first_present(row, _ANSWER_FIELDS)
    return (users[-1] if users else ""), messages[-1]["content"], (None if answer is None else _gold(answer)), messages


def _adapt_s1k(row, where):
    question = _require(row, ("question",), what="prompt", where=where)
    thinking = _require(row, ("thinking_trajectories",), what="response", where=where)
    response = _join_thinking(thinking, row.get("attempt"))
    solution = _require(row, ("solution",), what="answer", where=where)
    return str(question), response, _gold(last_boxed(str(solution)) or solution), None


def _adapt_s1k11(row, where, teacher: str = "deepseek"):
    question = _require(row, ("question",), what="prompt", where=where)
    thinking = _require(row, (f"{teacher}_thinking_trajectory",), what="response", where=where)
    response = _join_thinking(thinking, row.get(f"{teacher}_attempt"))
    solution = _require(row, ("solution",), what="answer", where=where)
    return str(question), response, _gold(last_boxed(str(solution)) or solution), None


def _adapt_boba(row, where):
    prompt = str(_require(row, ("prompt",), what="prompt", where=where))
    # The SFT file's prompts may come already rendered in ChatML; keep only the user text so the student's
    # own chat template is applied exactly once.
    match = _CHATML_USER.search(prompt)
    if match:
        prompt = match.group(1)
    response = str(_require(row, ("response", "answer", "completion"), what="response", where=where))
    _, gold = _first_present(row, ("solutions", "gold", "ground_truth"))
    if gold is None:
        gold = last_boxed(response)
        if gold is None:
            raise DataError(f"{where}: missing answer: no 'solutions' field and no \\boxed{{}} in the response")
    return prompt, response, _gold(gold), None


def _adapt_openthoughts(row, where):
    if "conversations" in row and row["conversations"]:
        turns = row["conversations"]
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        messages = []
        if row.get("system"):
            messages.append({"role": "system", "content": str(row["system"])})
        for turn in turns:
            role = roles.get(str(turn.get("from", turn.get("role"))))
            if role is None:
                raise DataError(f"{where}: unknown speaker {turn.get('from')!r} in 'conversations'")
            messages.append({"role": role, "content": str(turn.get("value", turn.get("content")))})
        return _adapt_messages({**row, "messages": messages}, where)
    problem = _require(row, ("problem",), what="prompt", where=where)
    reasoning = _require(row, ("deepseek_reasoning",), what="response", where=where)
    response = _join_thinking(reasoning, row.get("deepseek_solution"))
    _, gold = _first_present(row, ("ground_truth_solution", "answer"))
    gold = None if gold is None else (last_boxed(str(gold)) or gold)
    return str(problem), response, (None if gold is None else _gold(gold)), None


ADAPTERS = {
    "canonical": _adapt_canonical,
    "messages": _adapt_messages,
    "s1k": _adapt_s1k,
    "s1k-1.1": _adapt_s1k11,
    "s1k-1.1-gemini": lambda row, where: _adapt_s1k11(row, where, teacher="gemini"),
    "areal-boba": _adapt_boba,
    "boba": _adapt_boba,
    "openthoughts": _adapt_openthoughts,
}


def detect_adapter(row: Mapping[str, Any]) -> str:
    """Name of the adapter that fits a raw row, judged from its fields."""
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys or {"problem", "deepseek_reasoning"} <= keys:
        return "openthoughts"
    if "deepseek_thinking_trajectory" in keys:
        return "s1k-1.1"
    if "thinking_trajectories" in keys:
        return "s1k"
    if "prompt" in keys and "answer" in keys and not keys & {"response", "completion", "trace", "output"}:
        return "areal-boba"
    return "canonical"


def adapt_row(
    row: Mapping[str, Any],
    *,
    adapter: str = "auto",
    index: int = 0,
    source: str = "",
    require_answer: bool = True,
) -> Record:
    """Turn one raw row into a :class:`Record`; errors name the field and the record (``source`` line)."""
    if isinstance(row, Record):
        return row
    if not isinstance(row, Mapping):
        raise DataError(f"{_where(source, index, None)}: expected a mapping of fields, got {type(row).__name__}")
    name = detect_adapter(row) if adapter == "auto" else adapter
    if name not in ADAPTERS:
        raise ValueError(f"adapter must be 'auto' or one of {sorted(ADAPTERS)}, got {adapter!r}")
    raw_id = row.get("id", row.get("query_id", row.get("idx")))
    where = _where(source, index, None if raw_id is None else str(raw_id))
    prompt, response, answer, messages = ADAPTERS[name](row, where)
    if not response.strip():
        raise DataError(f"{where}: the 'response' field is empty")
    if answer is None and require_answer:
        raise DataError(
            f"{where}: missing answer field (one of {', '.join(_ANSWER_FIELDS)}); "
            "pass require_answer=False to load traces without gold answers"
        )
    record_id = str(raw_id) if raw_id is not None else f"{Path(source).stem or 'record'}-{index}"
    meta = {"adapter": name}
    return Record(id=record_id, prompt=prompt, response=response, answer=answer, messages=messages, meta=meta)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def read_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file with their 1-based numbers; bad bytes name the file and line."""
    path = Path(path)
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not UTF-8 text (byte {e.start} of the line is "
                                 f"0x{raw[e.start]:02x}); save the file as UTF-8") from None
            if line.strip():
                yield line_no, line


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for line_no, line in read_text_lines(path):
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line_no}: not valid JSON ({err.msg})") from None


def _iter_json(path: Path) -> Iterator[tuple[int, dict]]:
    from t3s.io import read_json

    data = read_json(path)  # names the file on bad bytes or bad JSON
    if isinstance(data, dict):  # {"data": [...]} or a column-oriented dict
        data = data.get("data", data.get("train", data))
    if isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    yield from enumerate(data, start=1)


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    n = 0
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                n += 1
                yield n, row


def _iter_hf_dataset(dataset: Any) -> Iterator[tuple[int, dict]]:
    # Duck-typed so `datasets` stays an optional dependency: a Dataset iterates as dicts.
    yield from enumerate(iter(dataset), start=1)


def _guess_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "hf"
        return "parquet"
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of {path}; pass format='jsonl' | 'json' | 'parquet' | 'hf'")


def _rows(source: Any, fmt: str) -> tuple[Iterator[tuple[int, dict]], str]:
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"dataset not found: {path}")
        fmt = _guess_format(path) if fmt == "auto" else fmt
        if fmt == "jsonl":
            return _iter_jsonl(path), str(path)
        if fmt == "json":
            return _iter_json(path), str(path)
        if fmt == "parquet":
            return _iter_parquet(path), str(path)
        if fmt == "hf":
            try:
                import datasets
            except ImportError as err:
                raise ImportError(f"{path} is a saved Hugging Face dataset; install `datasets` to read it") from err
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            return _iter_hf_dataset(loaded), str(path)
        raise ValueError(f"format must be 'auto', 'jsonl', 'json', 'parquet' or 'hf', got {fmt!r}")
    if isinstance(source, Mapping) and "train" in source and hasattr(source["train"], "column_names"):
        source = source["train"]  # a datasets.DatasetDict: its train split
    if isinstance(source, Iterable) and not isinstance(source, Mapping):
        return _iter_hf_dataset(source), ("dataset" if hasattr(source, "column_names") else "")
    raise TypeError(
        "path_or_dataset must be a path (JSONL / JSON / Parquet / saved HF dataset), a `datasets.Dataset` or a "
        f"list of dicts / Records, got {type(source).__name__}"
    )


def load_records(
    path_or_dataset: str | os.PathLike | Iterable[Mapping[str, Any] | Record],
    *,
    format: str = "auto",
    adapter: str = "auto",
    limit: int | None = None,
    require_answer: bool = True,
) -> list[Record]:
    """Read a dataset into canonical :class:`Record` objects.

    Args:
        path_or_dataset: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder of Parquet files, a folder saved
            with ``datasets.save_to_disk``, a ``datasets.Dataset``, or a list of dicts / Records.
        format: ``"auto"`` (from the extension) or ``"jsonl"``, ``"json"``, ``"parquet"``, ``"hf"``.
        adapter: ``"auto"`` (from the first record's fields) or one of :data:`ADAPTERS`.
        limit: keep only the first ``limit`` records.
        require_answer: raise when a record has no gold answer (needed for training accuracy). Set ``False``
            for trace-only data such as OpenThoughts' default config; ``answer`` is then ``None``.

    Raises:
        DataError (a ValueError): empty dataset; a record missing its prompt / response / answer field (the
            message names the field, the record's line and id); duplicate ids.
    """
    rows, source = _rows(path_or_dataset, format)
    chosen = adapter
    records: list[Record] = []
    for index, row in rows:
        if limit is not None and len(records) >= limit:
            break
        if chosen == "auto" and not isinstance(row, Record):
            chosen = detect_adapter(row)  # decided once, so a dataset is read with one consistent schema
        records.append(adapt_row(row, adapter=chosen, index=index, source=source, require_answer=require_answer))
    if not records:
        raise DataError(f"dataset {source or type(path_or_dataset).__name__} is empty: no records to load")
    seen: dict[str, int] = {}
    for position, record in enumerate(records, start=1):
        if record.id in seen:
            raise DataError(f"duplicate record id {record.id!r} (records {seen[record.id]} and {position})")
        seen[record.id] = position
    return records


# --------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------


@dataclass
class TokenizedExample:
    """A tokenized record: ``labels`` is ``input_ids`` on response tokens and ``-100`` elsewhere (unshifted).

    ``token_weight`` (AR selections) is a per-position loss weight aligned with ``labels`` (0 wherever labels
    are ``-100``); ``target_mask`` (dLLM selections) marks response tokens that must always be masked.
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    response_start: int
    token_weight: list[float] | None = None
    target_mask: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, record: Record) -> tuple[str, str, bool]:
    """(prompt text, full text, add_special_tokens) for ``record``; the prompt text is a prefix of the full text."""
    if has_chat_template(tokenizer):
        chat = record.chat()
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        # Chat templates render the special tokens themselves.
        return prompt, full, False
    # No chat template: plain concatenation, with the tokenizer's usual special tokens (BOS) and an EOS appended
    # so the student learns to stop.
    eos = getattr(tokenizer, "eos_token", None) or ""
    return record.prompt, record.prompt + record.response + eos, True


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, offsets: bool = False) -> dict:
    return tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)


def _response_start(tokenizer: Any, prompt: str, full: str, add_special: bool, full_ids: list[int]) -> int:
    prompt_ids = _encode(tokenizer, prompt, add_special)["input_ids"]
    # Special tokens appended after the prompt (e.g. EOS) are not part of it.
    if add_special and prompt_ids and prompt_ids[-1] == getattr(tokenizer, "eos_token_id", None):
        prompt_ids = prompt_ids[:-1]
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return len(prompt_ids)
    # A token merged across the prompt/response boundary: the first token ending inside the response is the
    # first response token.
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently when the response follows it")
    offsets = _encode(tokenizer, full, add_special, offsets=True).get("offset_mapping")
    if offsets is None:
        raise ValueError("prompt tokens are not a prefix of prompt+response tokens and the tokenizer has no offsets")
    for j, (_, end) in enumerate(offsets):
        if end > len(prompt):
            return j
    return len(full_ids)


def tokenize_record(
    record: Record,
    tokenizer: Any,
    *,
    max_tokens: int = 32768,
    truncation: Truncation = "error",
) -> TokenizedExample:
    """Tokenize one record with labels on response tokens only.

    Args:
        record: the canonical record.
        tokenizer: a Hugging Face tokenizer. With a ``chat_template`` the chat is rendered by it (prompt = the
            conversation up to the generation prompt); without one, ``prompt + response + eos`` is tokenized.
        max_tokens: longest sequence allowed (traces up to 32768 tokens are supported).
        truncation: what to do with a longer sequence: ``"error"`` raises; ``"right"`` keeps the first
            ``max_tokens`` tokens (the end of the trace is lost); ``"left"`` keeps the last ``max_tokens``
            (the start of the prompt is lost). Either way at least one response token must remain.

    Returns:
        :class:`TokenizedExample` with ``labels[j] = input_ids[j]`` for ``j >= response_start`` and ``-100``
        before (and always at ``j = 0``, which nothing predicts).
    """
    if truncation not in ("error", "left", "right"):
        raise ValueError(f"truncation must be 'error', 'left' or 'right', got {truncation!r}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    prompt, full, add_special = _render(tokenizer, record)
    input_ids = list(_encode(tokenizer, full, add_special)["input_ids"])
    start = _response_start(tokenizer, prompt, full, add_special, input_ids)
    if start >= len(input_ids):
        raise DataError(f"record {record.id!r}: the response produced no tokens")
    if len(input_ids) > max_tokens:
        if truncation == "error":
            raise DataError(
                f"record {record.id!r} has {len(input_ids)} tokens, more than max_tokens={max_tokens}; "
                "raise max_tokens or pass truncation='right' / 'left'"
            )
        if truncation == "right":
            if start >= max_tokens:
                raise DataError(
                    f"record {record.id!r}: its prompt alone ({start} tokens) fills max_tokens={max_tokens}"
                )
            input_ids = input_ids[:max_tokens]
        else:
            cut = len(input_ids) - max_tokens
            input_ids = input_ids[cut:]
            start = max(0, start - cut)
    start = max(start, 1)
    labels = [IGNORE_INDEX] * start + input_ids[start:]
    return TokenizedExample(id=record.id, input_ids=input_ids, labels=labels, response_start=start)


def tokenize_records(
    records: Iterable[Record],
    tokenizer: Any,
    *,
    max_tokens: int = 32768,
    truncation: Truncation = "error",
    progress: bool = False,
) -> list[TokenizedExample]:
    """:func:`tokenize_record` over many records (with an optional progress bar)."""
    records = list(records)
    if progress:
        from tqdm.auto import tqdm

        records = tqdm(records, desc="tokenize", unit="ex")
    return [tokenize_record(r, tokenizer, max_tokens=max_tokens, truncation=truncation) for r in records]


# --------------------------------------------------------------------------------------------------------
# Batching: length buckets, padded collate, packing
# --------------------------------------------------------------------------------------------------------


def length_buckets(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches of similar length whose padded size ``len(batch) * max_len`` fits ``batch_tokens``.

    Longest first, so the memory peak shows up on the first batch rather than after hours. A sequence longer
    than ``batch_tokens`` gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _weights_or_default(example: TokenizedExample) -> list[float]:
    if example.token_weight is not None:
        return list(example.token_weight)
    return [0.0 if label == IGNORE_INDEX else 1.0 for label in example.labels]


def collate(examples: Sequence[TokenizedExample], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad examples into a batch.

    Returns ``input_ids``, ``labels`` (``-100`` on padding), ``attention_mask`` (``[B, L]`` long); plus
    ``token_weight`` (``[B, L]`` float32, 0 on padding and prompt) when any example carries a selection, and
    ``target_mask`` (``[B, L]`` bool) when any example carries dLLM targets.
    """
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(e) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    with_weight = any(e.token_weight is not None for e in examples)
    with_targets = any(e.target_mask is not None for e in examples)
    token_weight = torch.zeros((batch, length), dtype=torch.float32) if with_weight else None
    target_mask = torch.zeros((batch, length), dtype=torch.bool) if with_targets else None
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
        if token_weight is not None:
            token_weight[row, :n] = torch.tensor(_weights_or_default(example), dtype=torch.float32)
        if target_mask is not None and example.target_mask is not None:
            target_mask[row, :n] = torch.tensor(example.target_mask, dtype=torch.bool)
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if token_weight is not None:
        out["token_weight"] = token_weight
    if target_mask is not None:
        out["target_mask"] = target_mask
    return out


@dataclass
class PackedBatch:
    """Several examples packed into one row of at most ``max_tokens`` tokens (batch dimension 1).

    ``position_ids`` restart at 0 for every document and ``cu_seqlens`` (int32, ``[docs + 1]``) holds the
    document boundaries, the layout varlen (flash) attention expects; :meth:`attention_mask_4d` gives the
    equivalent block-diagonal causal mask for attention backends without varlen support. Each document's
    first label is ``-100`` so no token is ever predicted across a document boundary.
    """

    input_ids: Any  # [1, T] long
    labels: Any  # [1, T] long
    position_ids: Any  # [1, T] long
    cu_seqlens: Any  # [docs + 1] int32
    max_seqlen: int
    example_ids: list[str]
    token_weight: Any = None  # [1, T] float32 or None
    target_mask: Any = None  # [1, T] bool or None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def attention_mask_4d(self) -> Any:
        """Boolean ``[1, 1, T, T]`` mask: causal within each document, nothing across documents."""
        import torch

        T = self.num_tokens
        doc = torch.repeat_interleave(
            torch.arange(len(self.example_ids)), (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        )
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return (causal & (doc[:, None] == doc[None, :]))[None, None]


def pack_examples(examples: Sequence[TokenizedExample], max_tokens: int) -> list[PackedBatch]:
    """Pack examples into rows of at most ``max_tokens`` tokens (first-fit decreasing, deterministic).

    Raises ``ValueError`` for an example longer than ``max_tokens``.
    """
    import torch

    for example in examples:
        if len(example) > max_tokens:
            raise ValueError(f"example {example.id!r} has {len(example)} tokens, more than max_tokens={max_tokens}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i)):
        n = len(examples[i])
        slot = next((r for r, room in enumerate(free) if room >= n), None)
        if slot is None:
            rows.append([i])
            free.append(max_tokens - n)
        else:
            rows[slot].append(i)
            free[slot] -= n
    packed = []
    with_weight = any(e.token_weight is not None for e in examples)
    with_targets = any(e.target_mask is not None for e in examples)
    for members in rows:
        docs = [examples[i] for i in members]
        labels = []
        for doc in docs:
            labels += [IGNORE_INDEX] + list(doc.labels[1:])
        lengths = [len(d) for d in docs]
        cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        weight = None
        if with_weight:
            weight = torch.tensor([w for d in docs for w in [0.0] + _weights_or_default(d)[1:]])[None]
        targets = None
        if with_targets:
            targets = torch.tensor([bool(t) for d in docs for t in (d.target_mask or [0] * len(d))])[None]
        packed.append(
            PackedBatch(
                input_ids=torch.tensor([t for d in docs for t in d.input_ids])[None],
                labels=torch.tensor(labels)[None],
                position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                cu_seqlens=cu,
                max_seqlen=max(lengths),
                example_ids=[d.id for d in docs],
                token_weight=weight,
                target_mask=targets,
            )
        )
    return packed


def with_token_weight(example: TokenizedExample, weight: Sequence[float]) -> TokenizedExample:
    """A copy of ``example`` carrying ``weight`` as its ``token_weight`` (length must match)."""
    if len(weight) != len(example):
        raise ValueError(f"token_weight has {len(weight)} entries, example {example.id!r} has {len(example)} tokens")
    return replace(example, token_weight=[float(w) for w in weight])
