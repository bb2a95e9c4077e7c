"""Records, dataset adapters, tokenization with response-only labels, bucketing, collate and packing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from profile_fixtures import tiny_records, tiny_tokenizer

from t3s.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    TokenizedExample,
    adapt_row,
    collate,
    detect_adapter,
    last_boxed,
    length_buckets,
    load_records,
    pack_examples,
    tokenize_record,
    tokenize_records,
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------- adapters


S1K_ROW = {
    "question": "What is 2+2?", "solution": "It is $\\boxed{4}$.", "cot_type": "math",
    "thinking_trajectories": ["two and two make four"], "attempt": "The answer is \\boxed{4}",
}
S1K11_ROW = {
    "question": "What is 3+3?", "solution": "6", "deepseek_thinking_trajectory": "three and three",
    "deepseek_attempt": "\\boxed{6}", "gemini_thinking_trajectory": "g", "gemini_attempt": "g6",
}
BOBA_ROW = {
    "prompt": "<|im_start|>user\nWhat is 5+5?<|im_end|>\n<|im_start|>assistant\n",
    "answer": "<think>five</think> so \\boxed{10}",
}
OT_ROW = {
    "system": "Think first.",
    "conversations": [{"from": "user", "value": "What is 1+1?"}, {"from": "assistant", "value": "It is 2."}],
}
OT_META_ROW = {"problem": "What is 7-2?", "deepseek_reasoning": "seven minus two", "deepseek_solution": "\\boxed{5}",
               "ground_truth_solution": "\\boxed{5}", "domain": "math"}
MSG_ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"},
                        {"role": "assistant", "content": "3"}], "answer": "3"}


@pytest.mark.parametrize(
    ("row", "adapter", "prompt", "response_part", "answer"),
    [
        pytest.param({"id": "a", "prompt": "p", "response": "r", "answer": "1"}, "canonical", "p", "r", "1",
                     id="canonical"),
        pytest.param(S1K_ROW, "s1k", "What is 2+2?", "<think>\ntwo and two make four\n</think>", "4", id="s1k"),
        pytest.param(S1K11_ROW, "s1k-1.1", "What is 3+3?", "three and three\n</think>\n\n\\boxed{6}", "6",
                     id="s1k-1.1"),
        pytest.param(BOBA_ROW, "areal-boba", "What is 5+5?", "<think>five</think>", "10", id="areal-boba"),
        pytest.param(OT_ROW, "openthoughts", "What is 1+1?", "It is 2.", None, id="openthoughts"),
        pytest.param(OT_META_ROW, "openthoughts", "What is 7-2?", "seven minus two", "5", id="openthoughts-meta"),
        pytest.param(MSG_ROW, "messages", "1+2?", "3", "3", id="messages"),
    ],
)
def test_adapters_map_each_schema_to_a_record(row, adapter, prompt, response_part, answer):
    assert detect_adapter(row) == adapter
    record = adapt_row(row, require_answer=answer is not None)
    assert record.prompt == prompt
    assert response_part in record.response
    assert record.answer == answer


def test_chat_adapters_keep_the_whole_conversation():
    record = adapt_row(OT_ROW, require_answer=False)
    assert [m["role"] for m in record.messages] == ["system", "user", "assistant"]
    assert adapt_row(MSG_ROW).messages[0] == {"role": "system", "content": "Be brief."}


def test_s1k11_gemini_teacher_and_boxed_extraction():
    assert adapt_row(S1K11_ROW, adapter="s1k-1.1-gemini").response.endswith("g6")
    assert last_boxed("a \\boxed{x} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("no box") is None


# ----------------------------------------------------------------------------------------------- loading


def test_load_jsonl_json_parquet_and_lists_agree(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "response": f"r{i}", "answer": str(i)} for i in range(4)]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    loaded = [load_records(src) for src in (jsonl, tmp_path / "d.json", tmp_path / "d.parquet", rows)]
    assert all(records == loaded[0] for records in loaded)
    assert [r.id for r in loaded[0]] == ["r0", "r1", "r2", "r3"]
    assert len(load_records(jsonl, limit=2)) == 2


def test_missing_ids_are_derived_from_the_source(tmp_path):
    path = _write_jsonl(tmp_path / "traces.jsonl", [{"prompt": "p", "response": "r", "answer": "a"}] * 2)
    assert [r.id for r in load_records(path)] == ["traces-1", "traces-2"]


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="empty"):
        load_records([])


def test_missing_fields_name_the_field_the_line_and_the_id(tmp_path):
    rows = [{"id": "ok", "prompt": "p", "response": "r", "answer": "1"}, {"id": "bad", "prompt": "p", "answer": "1"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl line 2 \(id 'bad'\): missing response field 'response'"):
        load_records(path, adapter="canonical")
    no_answer = _write_jsonl(tmp_path / "n.jsonl", [{"id": "x", "prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match=r"id 'x'.*missing answer field"):
        load_records(no_answer)
    assert load_records(no_answer, require_answer=False)[0].answer is None


def test_bad_json_and_duplicate_ids_are_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_records(tmp_path / "bad.jsonl")
    rows = [{"id": "same", "prompt": "p", "response": "r", "answer": "1"}] * 2
    with pytest.raises(DataError, match="duplicate record id 'same'"):
        load_records(rows)


# ----------------------------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_chat_template_labels_only_the_response(tok):
    record = Record(id="x", prompt="Hi?", response="Yes.", answer="y")
    ex = tokenize_record(record, tok, max_tokens=100)
    text = tok.decode(ex.input_ids)
    assert text.replace(" ", "").startswith("<|im_start|>user")
    prompt_part = tok.decode(ex.input_ids[: ex.response_start]).replace(" ", "")
    assert prompt_part.endswith("<|im_start|>assistant\n")
    labelled = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert labelled == ex.input_ids[ex.response_start :]
    assert all(label == IGNORE_INDEX for label in ex.labels[: ex.response_start])
    # The response and the end-of-turn token are learned.
    assert tok.decode(labelled).replace(" ", "").startswith("Yes.<|im_end|>")


def test_messages_render_every_turn_but_label_the_last_answer(tok):
    record = adapt_row(MSG_ROW)
    ex = tokenize_record(record, tok, max_tokens=200)
    assert "Be brief." in tok.decode(ex.input_ids).replace(" ", "").replace("Bebrief.", "Be brief.")
    assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != -100])[0] == "3"


def test_without_chat_template_prompt_and_response_are_concatenated_with_eos():
    plain = tiny_tokenizer(chat_template=False)
    ex = tokenize_record(Record(id="x", prompt="ab", response="cd", answer=None), plain, max_tokens=10)
    assert ex.input_ids == plain.convert_tokens_to_ids(["a", "b", "c", "d", "<|endoftext|>"])
    assert ex.response_start == 2
    assert ex.labels == [-100, -100, *ex.input_ids[2:]]


def test_first_label_is_never_set_even_with_an_empty_prompt():
    plain = tiny_tokenizer(chat_template=False)
    ex = tokenize_record(Record(id="x", prompt="", response="cd", answer=None), plain, max_tokens=10)
    assert ex.labels[0] == IGNORE_INDEX and ex.response_start == 1


def test_truncation_policies(tok):
    record = Record(id="long", prompt="Q?", response="x" * 60, answer="1")
    full = tokenize_record(record, tok, max_tokens=1000)
    with pytest.raises(DataError, match=r"'long' has \d+ tokens, more than max_tokens=40"):
        tokenize_record(record, tok, max_tokens=40)
    right = tokenize_record(record, tok, max_tokens=40, truncation="right")
    assert right.input_ids == full.input_ids[:40] and right.response_start == full.response_start
    left = tokenize_record(record, tok, max_tokens=40, truncation="left")
    assert left.input_ids == full.input_ids[-40:]
    assert left.labels == full.labels[-40:][:0] + [-100] + full.labels[-39:]
    with pytest.raises(DataError, match="prompt alone"):
        tokenize_record(record, tok, max_tokens=full.response_start, truncation="right")


# ----------------------------------------------------------------------------------------------- batching


def _examples(tok, n=6):
    return tokenize_records(tiny_records(n), tok, max_tokens=1000)


def test_length_buckets_fit_the_token_budget():
    lengths = [5, 50, 7, 20, 49, 3, 100]
    buckets = length_buckets(lengths, batch_tokens=100)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        assert len(bucket) * max(lengths[i] for i in bucket) <= 100 or len(bucket) == 1
    assert buckets[0] == [6]  # longest first


def test_collate_pads_right_and_carries_weights(tok):
    examples = _examples(tok, 3)
    batch = collate(examples, tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for row, ex in enumerate(examples):
        n = len(ex)
        assert batch["attention_mask"][row].sum() == n
        assert batch["labels"][row, n:].eq(-100).all() and batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
    weighted = [TokenizedExample(**{**ex.__dict__, "token_weight": [0.5] * len(ex)}) for ex in examples[:1]]
    out = collate(weighted + examples[1:], tok.pad_token_id)
    assert out["token_weight"].shape == out["labels"].shape
    assert torch.equal(out["token_weight"][1], (out["labels"][1] != -100).float())  # default: labelled tokens


def test_pack_examples_fill_rows_and_restart_positions(tok):
    examples = _examples(tok, 6)
    max_tokens = 2 * max(len(e) for e in examples) + 10
    packed = pack_examples(examples, max_tokens)
    assert sorted(i for p in packed for i in p.example_ids) == sorted(e.id for e in examples)
    assert len(packed) < len(examples)
    by_id = {e.id: e for e in examples}
    for row in packed:
        assert row.num_tokens <= max_tokens
        cu = row.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == row.num_tokens and row.cu_seqlens.dtype == torch.int32
        for k, example_id in enumerate(row.example_ids):
            ex = by_id[example_id]
            span = slice(cu[k], cu[k + 1])
            assert row.input_ids[0, span].tolist() == ex.input_ids
            assert row.position_ids[0, span].tolist() == list(range(len(ex)))
            assert row.labels[0, cu[k]] == -100 and row.labels[0, span].tolist()[1:] == ex.labels[1:]
        mask = row.attention_mask_4d()[0, 0]
        for k in range(len(cu) - 1):  # causal inside a document, nothing across documents
            inside = mask[cu[k] : cu[k + 1]]
            assert inside[:, : cu[k]].sum() == 0 and inside[:, cu[k + 1] :].sum() == 0
        assert mask.sum() == sum((n * (n + 1)) // 2 for n in (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist())
    with pytest.raises(ValueError, match="more than max_tokens"):
        pack_examples(examples, 10)


class _FakeHFDataset:
    """Stands in for ``datasets.Dataset`` (not installed here): iterable rows plus ``column_names``."""

    column_names = ("id", "prompt", "response", "answer")

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_hf_datasets_and_dataset_dicts_are_read_by_duck_typing():
    rows = [{"id": "h0", "prompt": "p", "response": "r", "answer": "1"}]
    assert load_records(_FakeHFDataset(rows))[0].id == "h0"
    assert load_records({"train": _FakeHFDataset(rows)})[0].id == "h0"
    with pytest.raises(TypeError, match="path_or_dataset"):
        load_records(42)
