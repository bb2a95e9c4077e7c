"""The demo's synthetic reasoning task: integer arithmetic chains with verifiable answers, in two families.

A problem is ``x0 op1 x1 op2 x2 ...`` with operands in ``[lo, hi]`` and ``op`` in ``{+, -}``, evaluated left to
right, with no negative intermediate result. The **old family** is what the student θ0 is pretrained on; the
**new family** is what only teacher B shows (``TaskSpec.new_skill``): ``chain``, ``new_operands`` operands (one
more step than the old family's three, every single step inside what pretraining covered), or ``large``, three
operands with an answer above ``2·hi`` (the old family's answers stay at or below it), a slow-to-learn skill made
of new addition facts. ``pretrain_stream(new_prob=...)`` lets θ0 see a share of the new family, so it solves part
of it. Two "teachers" write the computation in different styles:

* **teacher A** (the student's own, terse style, used for pretraining)::

      55+39=94,94-61=33.####33

* **teacher B** (the teacher the student is continually distilled on, on both families): a wrapper of words and
  a different answer marker (``style="verbose"``; ``check=True`` adds a verification step)::

      Let me think step by step. First, 55+39=94. Next, 94-61=33. Next, 33+12=45. So the answer is \\boxed{45}

  or the shorter ``style="compact"``: ``Let me think. 55+39=94,94-61=33,33+12=45. So \\boxed{45}``, or only B's
  answer marker, ``style="marker"``: ``55+39=94,94-61=33,33+12=45.\\boxed{45}``.

Held-out problems are chosen by a hash of the operands and operators, so they are never seen in pretraining
nor in the teacher-B training set. Everything is a pure function of the seed.

Records use the canonical form ``{id, prompt, response, answer}``; the family is in the id
(``train-new-55+39-61+12``) and follows from the prompt and the task spec (:func:`family_of`).
"""

from __future__ import annotations

import hashlib
import random
import re
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
    """``operands[0] ops[0] operands[1] ops[1] ...`` evaluated left to right (one step per operator)."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.operands) != len(self.ops) + 1 or not self.ops or any(o not in "+-" for o in self.ops):
            raise ValueError(f"Problem: need k+1 operands and k >= 1 operators in '+-', got {self.operands} "
                             f"{self.ops}")

    @classmethod
    def parse(cls, key: str) -> Problem:
        """``Problem.parse("55+39-61")``."""
        parts = re.split(r"([+-])", key)
        return cls(tuple(int(x) for x in parts[::2]), tuple(parts[1::2]))

    @property
    def values(self) -> list[int]:
        """The running result after each step."""
        out, v = [], self.operands[0]
        for op, x in zip(self.ops, self.operands[1:]):
            v = v + x if op == "+" else v - x
            out.append(v)
        return out

    @property
    def steps(self) -> list[tuple[int, str, int, int]]:
        """``(left, op, right, result)`` per step."""
        lefts = [self.operands[0], *self.values[:-1]]
        return list(zip(lefts, self.ops, self.operands[1:], self.values))

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def key(self) -> str:
        return str(self.operands[0]) + "".join(f"{op}{x}" for op, x in zip(self.ops, self.operands[1:]))

    @property
    def prompt(self) -> str:
        return self.key


FAMILIES = ("old", "new")
NEW_SKILLS = ("chain", "large")
"""What the new family asks for: ``chain``, one more step (``new_operands`` operands); ``large``, three-operand
problems whose answer exceeds ``2·hi``, i.e. addition facts with a result above ``2·hi`` in the last step, which
the old family never needs."""


@dataclass(frozen=True)
class TaskSpec:
    """The task's knobs. ``heldout_percent`` of all problems (by hash) form the held-out split.

    The old family (θ0's pretraining) has three operands; the new family, which only teacher B shows, has
    ``new_operands`` operands, and every step of it stays inside what pretraining covered (a left value in
    ``[0, 2·hi]``, a right operand in ``[lo, hi]``, a result in ``[0, 3·hi]``): the new skill is chaining one
    more step, not new arithmetic facts.
    """

    lo: int = 10
    hi: int = 29
    heldout_percent: int = 10
    new_operands: int = 4
    new_skill: str = "chain"

    def __post_init__(self) -> None:
        if not (0 <= self.lo <= self.hi):
            raise ValueError(f"TaskSpec: need 0 <= lo <= hi, got lo={self.lo}, hi={self.hi}")
        if not (0 < self.heldout_percent < 100):
            raise ValueError(f"TaskSpec: heldout_percent must be in (0, 100), got {self.heldout_percent}")
        if not 4 <= self.new_operands <= 8:
            raise ValueError(f"TaskSpec: new_operands must be in [4, 8], got {self.new_operands}")
        if self.new_skill not in NEW_SKILLS:
            raise ValueError(f"TaskSpec: new_skill must be one of {NEW_SKILLS}, got {self.new_skill!r}")

    @property
    def max_value(self) -> int:
        """Largest integer any trace can contain (a+b+c)."""
        return 3 * self.hi

    def operand_count(self, family: str) -> int:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        return self.new_operands if family == "new" and self.new_skill == "chain" else 3

    def family_of(self, p: Problem) -> str:
        """``old`` (what θ0 is pretrained on) or ``new`` (what only teacher B shows, see :data:`NEW_SKILLS`)."""
        if self.new_skill == "chain":
            return "old" if len(p.operands) <= 3 else "new"
        return "new" if p.answer > 2 * self.hi else "old"


DEFAULT_TASK = TaskSpec()


def is_heldout(p: Problem, spec: TaskSpec) -> bool:
    h = int.from_bytes(hashlib.sha256(p.key.encode()).digest()[:8], "big")
    return h % 100 < spec.heldout_percent


def _in_pretraining_range(p: Problem, spec: TaskSpec) -> bool:
    return all(0 <= r <= spec.max_value and (i == 0 or left <= 2 * spec.hi)
               for i, (left, _, _, r) in enumerate(p.steps))


def sample_problem(rng: random.Random, spec: TaskSpec, family: str = "old") -> Problem:
    """One problem of ``family`` whose every step lies in pretraining's range (rejection sampling)."""
    n = spec.operand_count(family)
    while True:
        operands = tuple(rng.randint(spec.lo, spec.hi) for _ in range(n))
        ops = tuple(rng.choice("+-") for _ in range(n - 1))
        p = Problem(operands, ops)
        if _in_pretraining_range(p, spec) and spec.family_of(p) == family:
            return p


def sample_problems(rng: random.Random, spec: TaskSpec, n: int, *, heldout: bool, exclude=(),
                    family: str = "old") -> list[Problem]:
    """``n`` distinct problems of ``family`` from the held-out (``heldout=True``) or training side."""
    seen = {p.key for p in exclude}
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * max(n, 1):
            raise ValueError(f"sample_problems: cannot find {n} distinct problems for {spec}")
        p = sample_problem(rng, spec, family)
        if is_heldout(p, spec) != heldout or p.key in seen:
            continue
        seen.add(p.key)
        out.append(p)
    return out


def _inv(op: str) -> str:
    return "-" if op == "+" else "+"


def pieces_a(p: Problem) -> list[str]:
    """Teacher A's trace as pieces; ``"".join`` gives the trace. Filler can go between pieces."""
    out: list[str] = []
    for i, (left, op, right, r) in enumerate(p.steps):
        out += ([","] if i else []) + [f"{left}{op}{right}={r}"]
    return [*out, ".", f"####{p.answer}"]


def trace_a(p: Problem) -> str:
    return "".join(pieces_a(p))


B_STYLES = ("verbose", "compact", "marker")


def trace_b(p: Problem, *, check: bool = True, style: str = "verbose") -> str:
    """Teacher B's trace (``check=False`` drops the verification step)."""
    if style not in B_STYLES:
        raise ValueError(f"trace_b: style must be one of {B_STYLES}, got {style!r}")
    eqs = [f"{left}{op}{right}={r}" for left, op, right, r in p.steps]
    last_left, last_op, last_right, _ = p.steps[-1]
    chk = f"{p.answer}{_inv(last_op)}{last_right}={last_left}"
    if style == "verbose":
        s = "Let me think step by step. First, " + ". Next, ".join(eqs) + "."
        if check:
            s += f" Check: {chk}, correct."
        return s + f" So the answer is \\boxed{{{p.answer}}}"
    if style == "marker":  # teacher A's computation, teacher B's answer marker only
        return ",".join(eqs) + (f". Check: {chk}." if check else ".") + f"\\boxed{{{p.answer}}}"
    s = "Let me think. " + ",".join(eqs) + "."
    if check:
        s += f" Check: {chk}."
    return s + f" So \\boxed{{{p.answer}}}"


def trace_a_with_filler(p: Problem, rng: random.Random, *, max_words: int = 3, vocab=None) -> str:
    """Teacher A's trace with 1..``max_words`` filler words inserted at one or two piece boundaries (the start
    included). The filler draws from :data:`FILLER_WORDS` and teacher B's words, so θ0 keeps computing
    whatever words surround the equations: under teacher B's wrapper it is still confident on the arithmetic."""
    vocab = vocab or FILLER_WORDS + B_WORDS
    pieces = pieces_a(p)
    out = list(pieces)
    slots = rng.sample(range(len(pieces)), k=rng.randint(1, 2))
    for s in sorted(slots, reverse=True):
        words = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, max_words)))
        out.insert(s, f"{words} " if s == 0 else f" {words} ")  # at the start like B's first word
    return "".join(out)


def word_salad(rng: random.Random, spec: TaskSpec, *, n_words: int = 24, phrases: bool = False) -> str:
    """Random text made of teacher B's words, numbers and punctuation (pretraining only).

    ``phrases=True`` draws whole teacher-B phrases too (``Let me think.``, ``So \\boxed{47}``, ...): the student
    knows B's phrases as language, as a pretrained LLM knows "let me think step by step", without ever having
    answered in B's style."""
    words = B_WORDS + tuple(str(rng.randint(0, spec.max_value)) for _ in range(6)) + tuple(".,:=+-")
    if not phrases:
        return " ".join(rng.choice(words) for _ in range(n_words))
    out = []
    while len(out) < n_words:
        if rng.random() < 0.35:
            out.append(rng.choice(B_PHRASES).format(n=rng.randint(0, spec.max_value)))
        else:
            out.append(rng.choice(words + FILLER_WORDS))
    return " ".join(out)


B_WORDS = ("Let", "me", "think", "step", "by", "First", "Next", "Check", "correct", "So", "the", "answer", "is")
"""Every word any teacher-B style uses (the word salad of pretraining draws from them)."""

B_PHRASES = ("Let me think.", "Let me think step by step.", "First,", "Next,", "So", "So \\boxed{{{n}}}",
             "So the answer is \\boxed{{{n}}}", "Check:", "correct.")
"""Teacher B's phrases, ``{n}`` a random number (the phrase salad of pretraining draws from them)."""

PREAMBLE_WORDS = ("Let me think", "Let me think step by step", "Ok", "Well", "Now we add", "Here we go",
                  "This is easy", "We take it")
"""Openings a pretraining trace may start with (``PretrainSpec.preamble_prob``): teacher B's among others."""


def record(p: Problem, response: str, *, prefix: str, spec: TaskSpec = DEFAULT_TASK) -> dict:
    return {"id": f"{prefix}-{spec.family_of(p)}-{p.key}", "prompt": p.prompt, "response": response,
            "answer": str(p.answer)}


def family_of(record_or_prompt, spec: TaskSpec = DEFAULT_TASK) -> str:
    """``old`` / ``new`` for a record (by its prompt) or a prompt string."""
    prompt = record_or_prompt["prompt"] if isinstance(record_or_prompt, dict) else str(record_or_prompt)
    return spec.family_of(Problem.parse(prompt))


def make_datasets(
    seed: int = 0,
    spec: TaskSpec = DEFAULT_TASK,
    *,
    n_train: int = 200,
    n_heldout: int = 200,
    new_fraction: float = 0.5,
    check_step: bool = True,
    style: str = "verbose",
) -> dict[str, list[dict]]:
    """The demo's data.

    ``train_b``: ``n_train`` teacher-B traces, ``new_fraction`` of them on the new family (shuffled);
    ``train_a``: the same problems in teacher A's style (a control); ``heldout_old`` / ``heldout_new``:
    ``n_heldout`` held-out problems of each family (teacher-B reference responses) and ``heldout`` both.
    """
    if not 0.0 <= new_fraction <= 1.0:
        raise ValueError(f"make_datasets: new_fraction must be in [0, 1], got {new_fraction}")
    rng = random.Random(f"t3s-demo-data-{seed}")
    n_new = round(n_train * new_fraction)
    train = sample_problems(rng, spec, n_train - n_new, heldout=False, family="old")
    train += sample_problems(rng, spec, n_new, heldout=False, family="new")
    rng.shuffle(train)
    held = {f: sample_problems(rng, spec, n_heldout, heldout=True, family=f) for f in FAMILIES}

    def b(p: Problem) -> str:
        return trace_b(p, check=check_step, style=style)

    out = {
        "train_b": [record(p, b(p), prefix="train", spec=spec) for p in train],
        "train_a": [record(p, trace_a(p), prefix="train", spec=spec) for p in train],
    }
    for f in FAMILIES:
        out[f"heldout_{f}"] = [record(p, b(p), prefix="heldout", spec=spec) for p in held[f]]
    out["heldout"] = out["heldout_old"] + out["heldout_new"]
    return out


def pretrain_stream(
    seed: int, spec: TaskSpec, *, filler_prob: float = 0.5, preamble_prob: float = 0.0, short_prob: float = 0.0,
    new_prob: float = 0.0,
) -> Iterator[tuple[str, str]]:
    """Endless ``(prompt, response)`` pairs of teacher-A traces on training-side problems; ``preamble_prob`` of
    them open with a sentence from :data:`PREAMBLE_WORDS` (``Ok. 55+39=94,...``); ``short_prob`` of the problems
    have two operands (one step) instead of three, so θ0 knows chains of more than one length; ``new_prob`` of
    them are new-family problems, so θ0 solves part of the new family (a strong student, not a blank one)."""
    rng = random.Random(f"t3s-demo-pretrain-{seed}")
    while True:
        if new_prob and rng.random() < new_prob:
            p = sample_problem(rng, spec, "new")
        else:
            p = sample_problem(rng, spec, "old")
            if short_prob and rng.random() < short_prob:
                p = Problem(p.operands[:2], p.ops[:1])
        if is_heldout(p, spec):
            continue
        text = trace_a_with_filler(p, rng) if rng.random() < filler_prob else trace_a(p)
        if preamble_prob and rng.random() < preamble_prob:
            text = f"{rng.choice(PREAMBLE_WORDS)}. {text}"
        yield p.prompt, text


def all_texts_for_vocab(spec: TaskSpec) -> list[str]:
    """Strings whose pre-tokens make up the task's closed vocabulary."""
    texts = [" ".join(str(i) for i in range(spec.max_value + 1))]
    p = Problem((spec.lo, spec.lo, spec.lo), ("+", "-"))
    texts += [trace_a(p)] + [trace_b(p, check=c, style=st) for c in (True, False) for st in B_STYLES]
    texts.append(" " + " ".join(FILLER_WORDS + B_WORDS))
    texts += list(FILLER_WORDS + B_WORDS)  # a trace may start with any of them (no leading space)
    texts += [f"{w}. " for w in PREAMBLE_WORDS]
    texts.append(" ".join(".,:=+-"))
    return texts


def extract_answer(text: str) -> str | None:
    """The answer after the last ``####`` or inside the last ``\\boxed{}``; ``None`` if neither is there."""

    cands = []
    for m in re.finditer(r"####\s*(-?\d+)", text):
        cands.append((m.start(), m.group(1)))
    for m in re.finditer(r"\\boxed\{\s*(-?\d+)\s*\}", text):
        cands.append((m.start(), m.group(1)))
    return max(cands)[1] if cands else None
