"""The demo's synthetic reasoning task: three-operand integer arithmetic with verifiable answers.

A problem is ``a op1 b op2 c`` with operands in ``[lo, hi]`` and ``op`` in ``{+, -}``, chosen so that no
intermediate result is negative. Two "teachers" write the same computation in different styles:

* **teacher A** (the student's own, terse style, used for pretraining)::

      55+39=94,94-61=33.####33

* **teacher B** (the "out-of-distribution" teacher the student is continually distilled on): a wrapper of
  words, an extra verification step and a different answer marker::

      Let me think step by step. First, 55+39=94. Next, 94-61=33. Check: 33+61=94, correct. So the answer is \\boxed{33}

Held-out problems are chosen by a hash of the operands and operators, so they are never seen in pretraining
nor in the teacher-B training set. Everything is a pure function of the seed.

Records use the canonical form ``{id, prompt, response, answer}``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

# Words used only to perturb pretraining text (so the arithmetic is not tied to one context).
FILLER_WORDS = (
    "well", "ok", "now", "then", "hmm", "we", "get", "have", "add", "take", "away", "sum", "total", "result",
    "number", "value", "this", "that", "it", "here", "also", "just", "sure", "right", "yes", "good", "fine",
    "done", "again", "easy", "clear", "simple", "plus", "minus", "gives", "makes", "equals",
)


@dataclass(frozen=True)
class Problem:
    a: int
    op1: str
    b: int
    op2: str
    c: int

    @property
    def r1(self) -> int:
        return self.a + self.b if self.op1 == "+" else self.a - self.b

    @property
    def answer(self) -> int:
        return self.r1 + self.c if self.op2 == "+" else self.r1 - self.c

    @property
    def key(self) -> str:
        return f"{self.a}{self.op1}{self.b}{self.op2}{self.c}"

    @property
    def prompt(self) -> str:
        return self.key


@dataclass(frozen=True)
class TaskSpec:
    """The task's knobs. ``heldout_percent`` of all problems (by hash) form the held-out split."""

    lo: int = 10
    hi: int = 29
    heldout_percent: int = 10

    def __post_init__(self) -> None:
        if not (0 <= self.lo <= self.hi):
            raise ValueError(f"TaskSpec: need 0 <= lo <= hi, got lo={self.lo}, hi={self.hi}")
        if not (0 < self.heldout_percent < 100):
            raise ValueError(f"TaskSpec: heldout_percent must be in (0, 100), got {self.heldout_percent}")

    @property
    def max_value(self) -> int:
        """Largest integer any trace can contain (a+b+c)."""
        return 3 * self.hi


DEFAULT_TASK = TaskSpec()


def is_heldout(p: Problem, spec: TaskSpec) -> bool:
    h = int.from_bytes(hashlib.sha256(p.key.encode()).digest()[:8], "big")
    return h % 100 < spec.heldout_percent


def sample_problem(rng: random.Random, spec: TaskSpec) -> Problem:
    """One problem with no negative intermediate result (rejection sampling)."""
    while True:
        a, b, c = (rng.randint(spec.lo, spec.hi) for _ in range(3))
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        p = Problem(a, op1, b, op2, c)
        if p.r1 >= 0 and p.answer >= 0:
            return p


def sample_problems(rng: random.Random, spec: TaskSpec, n: int, *, heldout: bool, exclude=()) -> list[Problem]:
    """``n`` distinct problems from the held-out (``heldout=True``) or training side of the split."""
    seen = {p.key for p in exclude}
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * max(n, 1):
            raise ValueError(f"sample_problems: cannot find {n} distinct problems for {spec}")
        p = sample_problem(rng, spec)
        if is_heldout(p, spec) != heldout or p.key in seen:
            continue
        seen.add(p.key)
        out.append(p)
    return out


def _inv(op: str) -> str:
    return "-" if op == "+" else "+"


def pieces_a(p: Problem) -> list[str]:
    """Teacher A's trace as pieces; ``"".join`` gives the trace. Filler can go between pieces."""
    return [f"{p.a}{p.op1}{p.b}={p.r1}", ",", f"{p.r1}{p.op2}{p.c}={p.answer}", ".", f"####{p.answer}"]


def trace_a(p: Problem) -> str:
    return "".join(pieces_a(p))


def trace_b(p: Problem, *, check: bool = True) -> str:
    """Teacher B's verbose trace (``check=False`` drops the verification step)."""
    s = f"Let me think step by step. First, {p.a}{p.op1}{p.b}={p.r1}. Next, {p.r1}{p.op2}{p.c}={p.answer}."
    if check:
        s += f" Check: {p.answer}{_inv(p.op2)}{p.c}={p.r1}, correct."
    return s + f" So the answer is \\boxed{{{p.answer}}}"


def trace_a_with_filler(p: Problem, rng: random.Random, *, max_words: int = 3, vocab=FILLER_WORDS) -> str:
    """Teacher A's trace with 1..``max_words`` filler words inserted at one or two piece boundaries."""
    pieces = pieces_a(p)
    out = list(pieces)
    slots = rng.sample(range(1, len(pieces)), k=rng.randint(1, 2))
    for s in sorted(slots, reverse=True):
        words = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, max_words)))
        out.insert(s, f" {words} ")
    return "".join(out)


def word_salad(rng: random.Random, spec: TaskSpec, *, n_words: int = 24) -> str:
    """Random text made of teacher B's words, numbers and punctuation (pretraining only)."""
    words = B_WORDS + tuple(str(rng.randint(0, spec.max_value)) for _ in range(6)) + tuple(".,:=+-")
    return " ".join(rng.choice(words) for _ in range(n_words))


B_WORDS = ("Let", "me", "think", "step", "by", "First", "Next", "Check", "correct", "So", "the", "answer", "is")


def record(p: Problem, response: str, *, prefix: str) -> dict:
    return {"id": f"{prefix}-{p.key}", "prompt": p.prompt, "response": response, "answer": str(p.answer)}


def make_datasets(
    seed: int = 0,
    spec: TaskSpec = DEFAULT_TASK,
    *,
    n_train: int = 200,
    n_heldout: int = 200,
    check_step: bool = True,
) -> dict[str, list[dict]]:
    """The demo's data: ``train_b`` (teacher-B traces), ``train_a`` (same problems, teacher-A traces, for a
    control run) and ``heldout`` (held-out problems with teacher-B traces as reference responses)."""
    rng = random.Random(f"t3s-demo-data-{seed}")
    train = sample_problems(rng, spec, n_train, heldout=False)
    held = sample_problems(rng, spec, n_heldout, heldout=True)
    return {
        "train_b": [record(p, trace_b(p, check=check_step), prefix="train") for p in train],
        "train_a": [record(p, trace_a(p), prefix="train") for p in train],
        "heldout": [record(p, trace_b(p, check=check_step), prefix="heldout") for p in held],
    }


def pretrain_stream(
    seed: int, spec: TaskSpec, *, filler_prob: float = 0.5
) -> Iterator[tuple[str, str]]:
    """Endless ``(prompt, response)`` pairs of teacher-A traces on training-side problems."""
    rng = random.Random(f"t3s-demo-pretrain-{seed}")
    while True:
        p = sample_problem(rng, spec)
        if is_heldout(p, spec):
            continue
        if rng.random() < filler_prob:
            yield p.prompt, trace_a_with_filler(p, rng)
        else:
            yield p.prompt, trace_a(p)


def all_texts_for_vocab(spec: TaskSpec) -> list[str]:
    """Strings whose pre-tokens make up the task's closed vocabulary."""
    texts = [" ".join(str(i) for i in range(spec.max_value + 1))]
    p = Problem(spec.lo, "+", spec.lo, "-", spec.lo)
    q = Problem(spec.hi, "-", spec.lo, "+", spec.lo)
    texts += [trace_a(p), trace_b(p), trace_b(q), trace_b(p, check=False)]
    texts.append(" " + " ".join(FILLER_WORDS + B_WORDS))
    texts.append(" ".join(".,:=+-"))
    return texts


def extract_answer(text: str) -> str | None:
    """The answer after the last ``####`` or inside the last ``\\boxed{}``; ``None`` if neither is there."""
    import re

    cands = []
    for m in re.finditer(r"####\s*(-?\d+)", text):
        cands.append((m.start(), m.group(1)))
    for m in re.finditer(r"\\boxed\{\s*(-?\d+)\s*\}", text):
        cands.append((m.start(), m.group(1)))
    return max(cands)[1] if cands else None
