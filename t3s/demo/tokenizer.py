"""A word-level tokenizer over the demo task's closed vocabulary, as a ``transformers`` fast tokenizer.

Pre-tokenisation splits text into whole numbers, words (with their leading space, GPT style), ``####``,
``\\boxed{``, single punctuation marks and single whitespace characters; each piece is one token of a
closed vocabulary built from the task. The ``Fuse`` decoder concatenates tokens, so ``decode(encode(s)) == s``
for every string made of vocabulary pieces. Special tokens: ``<s>`` (bos), ``</s>`` (eos), ``<pad>``,
``<unk>`` and the role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>`` used by the chat template::

    <s><|user|>55+39-61<|assistant|>55+39=94,94-61=33.####33</s>

Built offline, saved with ``save_pretrained`` and reloaded with ``AutoTokenizer.from_pretrained(path)``.
"""

from __future__ import annotations

from t3s.demo.task import DEFAULT_TASK, TaskSpec, all_texts_for_vocab

SPLIT_PATTERN = r"####|\\boxed\{| ?[A-Za-z]+|\d+|\s|[^\sA-Za-z\d]"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")


def build_vocab(spec: TaskSpec = DEFAULT_TASK, extra_texts=()) -> list[str]:
    """The closed vocabulary: special tokens first, then every pre-token of the task's texts, sorted."""
    pre = _pre_tokenizer()
    pieces: set[str] = set()
    for text in [*all_texts_for_vocab(spec), *extra_texts, "\n", " "]:
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(text))
    pieces.difference_update(SPECIAL_TOKENS)
    return [*SPECIAL_TOKENS, *sorted(pieces)]


def build_tokenizer(spec: TaskSpec = DEFAULT_TASK, extra_texts=()):
    """A ``PreTrainedTokenizerFast`` with bos/eos/pad/unk and a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = build_vocab(spec, extra_texts)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
