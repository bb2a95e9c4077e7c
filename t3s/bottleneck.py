"""The Imitation Bottleneck: the checkpoint of lowest training accuracy (paper eq. 1).

Three ways to pick it, all pure functions of an accuracy curve ``{step: accuracy}``:

* :func:`argmin_bottleneck` — over the whole trajectory (ties: the earliest step).
* :class:`OnlineBottleneckDetector` — the library's own online rule (the paper gives none): a new minimum
  is a value lower than the best so far by more than ``min_delta``; it is *confirmed* once ``patience``
  further evaluations bring no new minimum, and training may stop there.
* :func:`fixed_bottleneck` — T3S-simple: a fixed step (the paper: 10).

Eq. 1 ranges over θ(0), θ(1), …: θ0 itself is a candidate. When no later checkpoint is less accurate than θ0
there is no Imitation Shock and θb = θ0, so Δc ≡ 0 and T3S is SFT; :func:`shock_check` says so (the pipeline
stops before profiling unless ``bottleneck.on_no_shock=proceed``), and warns when the drop is within the
curve's own sampling noise. ``min_step`` > 0 leaves the first checkpoints out: a departure from Eq. 1, off by
default.

The default is ``argmin`` (Eq. 1). An early θb is costly: in the paper's selector sweep (Table 8) the true
bottleneck gives 77.3 AIME24/25, two evaluations earlier 74.5 and at step 2 68.3 — so a plateau before the true
minimum must not be taken for it, which the online rule can do when ``patience`` is short.

:func:`check_curve` refuses a curve that cannot locate θb: flat (every evaluation the same accuracy, e.g. all 0
because the answers lie beyond ``max_new_tokens``) or measured on mostly truncated / answerless completions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Bottleneck:
    step: int
    accuracy: float | None
    method: str
    confirmed_at: int | None = None
    """Step at which the online detector confirmed it (None for argmin / fixed, or never confirmed)."""

    def to_dict(self) -> dict:
        return {"step": self.step, "accuracy": self.accuracy, "method": self.method,
                "confirmed_at": self.confirmed_at}


def _check(curve: dict[int, float]) -> list[tuple[int, float]]:
    if not curve:
        raise ValueError("accuracy curve is empty: evaluate at least one checkpoint")
    items = sorted((int(s), float(a)) for s, a in curve.items())
    for s, a in items:
        if not 0.0 <= a <= 1.0 or a != a:
            raise ValueError(f"accuracy at step {s} is {a}; expected a value in [0, 1]")
    return items


class CurveError(ValueError):
    """A training-accuracy curve that cannot locate the Imitation Bottleneck; the message says what to change."""


class NoShockError(ValueError):
    """The curve never falls below θ0's accuracy: θb = θ0 and T3S would be SFT."""


NOISE_SIGMAS = 2.0
"""A drop below θ0's accuracy counts as clear when it exceeds this many standard errors."""


def shock_check(curve: dict[int, float], *, num_trials: int | None = None) -> dict | None:
    """Is there an Imitation Shock (a checkpoint after θ0 less accurate than θ0), and is it above the noise?

    ``num_trials``: completions behind each accuracy (prompts x samples); the noise is the binomial standard
    error of the difference of two accuracies over that many trials, ``sqrt((a0(1-a0) + am(1-am)) / n)``
    (taken as independent, which overstates it a little when the same prompts are scored). Returns None when
    the curve has no θ0 (step 0) value; otherwise a dict with ``shock``, ``clear``, the accuracies, the drop,
    the standard error and a ``message`` (None when the shock is clear).
    """
    items = dict(_check(curve))
    if 0 not in items:
        return None
    base = items[0]
    later = [(s, a) for s, a in items.items() if s > 0]
    out = {"base_accuracy": base, "min_step": None, "min_accuracy": None, "drop": 0.0, "standard_error": None,
           "num_trials": num_trials, "shock": False, "clear": False}
    if not later:
        out["message"] = "only θ0 was evaluated: no Imitation Shock can be seen"
        return out
    step, low = min(later, key=lambda sa: (sa[1], sa[0]))
    drop = base - low
    se = math.sqrt((base * (1 - base) + low * (1 - low)) / num_trials) if num_trials else None
    out.update(min_step=step, min_accuracy=low, drop=drop, standard_error=se, shock=drop > 0)
    out["clear"] = drop > 0 and (se is None or drop > NOISE_SIGMAS * se)
    if not out["shock"]:
        out["message"] = (f"no Imitation Shock: training accuracy never falls below θ0's {base:.3f} (lowest later "
                          f"{low:.3f} at step {step}), so by Eq. 1 θb = θ0, Δc ≡ 0 and T3S would equal SFT")
    elif not out["clear"]:
        out["message"] = (f"the Imitation Shock is within the measurement noise: the lowest accuracy {low:.3f} (step "
                          f"{step}) is {drop:.3f} below θ0's {base:.3f}, less than {NOISE_SIGMAS:g} binomial "
                          f"standard errors ({NOISE_SIGMAS:g} x {se:.3f} over {num_trials} completions); θb may be "
                          "noise: raise accuracy.num_prompts or num_samples")
    else:
        out["message"] = None
    return out


def describe(bn: dict) -> str:
    """How a bottleneck was chosen, in words (for logs and the report)."""
    method = bn.get("method")
    if method == "argmin":
        if bn.get("min_step"):
            return (f"argmin of training accuracy over steps >= {bn['min_step']} (bottleneck.min_step: a departure "
                    "from the paper's Eq. 1, which includes θ0)")
        return "argmin of training accuracy over the whole trajectory, θ0 included (paper Eq. 1)"
    if method == "fixed":
        return "fixed step (T3S-simple; the paper uses step 10), not searched"
    if bn.get("confirmed_at") is not None:
        return (f"online rule: lowest so far, confirmed at step {bn['confirmed_at']} (no lower value for `patience` "
                "evaluations)")
    return "online rule: lowest value seen, never confirmed (the run ended first)"


def check_curve(rows: list[dict], *, max_truncated_fraction: float = 0.5, max_new_tokens: int | None = None,
                longest_response: int | None = None) -> None:
    """Raise :class:`CurveError` when an accuracy curve cannot locate θb.

    ``rows``: one dict per evaluation with ``step``, ``train_accuracy`` and optionally
    ``train_truncated_fraction`` / ``train_no_answer_fraction`` (as :meth:`AccuracyResult.metrics` writes them).
    """
    rows = [r for r in rows if "train_accuracy" in r]
    if not rows:
        raise CurveError("no training accuracy was measured on the trajectory; check accuracy.every")
    budget = f"max_new_tokens={max_new_tokens}" if max_new_tokens is not None else "max_new_tokens"
    longest = f" (the longest training response is {longest_response} tokens)" if longest_response else ""
    for key, what in (("train_truncated_fraction", "hit the generation limit without an end token"),
                      ("train_no_answer_fraction", "contain no extractable final answer")):
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        if vals and sum(vals) / len(vals) > max_truncated_fraction:
            raise CurveError(
                f"on average {100 * sum(vals) / len(vals):.0f}% of the training-accuracy completions {what} "
                f"({budget}{longest}); the accuracy curve cannot see the answers, so θb would be arbitrary. Raise "
                "accuracy.max_new_tokens (or leave it unset to derive it from the traces), use "
                "generation.backend=vllm for long generations, check accuracy.verifier / the answer format (or "
                "bottleneck.on_bad_curve=warn to take θb anyway, recorded as unreliable)")
    accs = [float(r["train_accuracy"]) for r in rows]  # θ0 included: Eq. 1 ranges over θ(0), θ(1), ...
    if len(accs) > 1 and max(accs) == min(accs):
        value = accs[0]
        why = ("the student never produces a correct answer: check max_new_tokens against the trace lengths, the "
               "verifier and the gold answers" if value == 0.0 else
               "every training prompt is already solved: no Imitation Shock is visible on this subset (use more or "
               "harder accuracy prompts, accuracy.num_prompts)" if value == 1.0 else
               "the evaluation set is too small to resolve a change (raise accuracy.num_prompts or num_samples)")
        raise CurveError(
            f"training accuracy is {value:.3f} at every one of the {len(accs)} evaluated steps: a flat curve has no "
            f"minimum, so θb would be an arbitrary tie; {why}. To proceed without a curve use "
            "bottleneck.method=fixed (T3S-simple, step 10), or bottleneck.on_bad_curve=warn to take the tie anyway")


def argmin_bottleneck(curve: dict[int, float], *, min_step: int = 0) -> Bottleneck:
    """Earliest step of lowest accuracy among steps ``>= min_step`` (0: Eq. 1, θ0 included)."""
    items = [(s, a) for s, a in _check(curve) if s >= min_step]
    if not items:
        raise ValueError(f"no accuracy evaluated at step >= {min_step}")
    step, acc = min(items, key=lambda sa: (sa[1], sa[0]))
    return Bottleneck(step=step, accuracy=acc, method="argmin")


def fixed_bottleneck(step: int, curve: dict[int, float] | None = None) -> Bottleneck:
    if step < 1:
        raise ValueError(f"fixed bottleneck step must be >= 1, got {step}")
    return Bottleneck(step=step, accuracy=(curve or {}).get(step), method="fixed")


@dataclass
class OnlineBottleneckDetector:
    """Feed evaluations in step order with :meth:`update`; it answers whether the bottleneck is confirmed.

    Example: accuracies 0.9, 0.5, 0.2, 0.3, 0.4, 0.5 with ``patience=3`` -> bottleneck at the 0.2
    evaluation, confirmed three evaluations later.
    """

    patience: int = 3
    min_delta: float = 0.0
    min_step: int = 0
    best_step: int | None = None
    best_accuracy: float | None = None
    since_best: int = 0
    confirmed_at: int | None = None
    history: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    def update(self, step: int, accuracy: float) -> bool:
        """Record one evaluation; return True when it is a new minimum (the caller saves θb then)."""
        if self.history and step <= max(self.history):
            raise ValueError(f"steps must increase: got {step} after {max(self.history)}")
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy at step {step} is {accuracy}; expected a value in [0, 1]")
        self.history[step] = float(accuracy)
        if step < self.min_step:
            return False
        if self.best_accuracy is None or accuracy < self.best_accuracy - self.min_delta:
            self.best_step, self.best_accuracy, self.since_best = step, float(accuracy), 0
            self.confirmed_at = None
            return True
        self.since_best += 1
        if self.since_best >= self.patience and self.confirmed_at is None:
            self.confirmed_at = step
        return False

    @property
    def confirmed(self) -> bool:
        return self.confirmed_at is not None

    def result(self) -> Bottleneck:
        if self.best_step is None:
            raise ValueError("no evaluation at or after min_step yet")
        return Bottleneck(self.best_step, self.best_accuracy, "online", self.confirmed_at)

    def state_dict(self) -> dict:
        return {"patience": self.patience, "min_delta": self.min_delta, "min_step": self.min_step,
                "best_step": self.best_step, "best_accuracy": self.best_accuracy,
                "since_best": self.since_best, "confirmed_at": self.confirmed_at,
                "history": {str(k): v for k, v in self.history.items()}}


def detect_online(curve: dict[int, float], *, patience: int = 3, min_delta: float = 0.0,
                  min_step: int = 0) -> Bottleneck:
    """Replay a curve through :class:`OnlineBottleneckDetector`; stops at the first confirmation."""
    det = OnlineBottleneckDetector(patience=patience, min_delta=min_delta, min_step=min_step)
    for step, acc in _check(curve):
        det.update(step, acc)
        if det.confirmed:
            break
    return det.result()


def find_bottleneck(curve: dict[int, float] | None, *, method: str = "argmin", step: int = 10,
                    patience: int = 3, min_delta: float = 0.0, min_step: int = 0) -> Bottleneck:
    """Dispatch on ``method`` (``argmin`` (default, Eq. 1) / ``online`` / ``fixed``)."""
    if method == "fixed":
        return fixed_bottleneck(step, curve)
    if method == "argmin":
        return argmin_bottleneck(curve or {}, min_step=min_step)
    if method == "online":
        return detect_online(curve or {}, patience=patience, min_delta=min_delta, min_step=min_step)
    raise ValueError(f"bottleneck method must be argmin, online or fixed, got {method!r}")
