"""Final-answer extraction and equivalence for training accuracy and held-out evaluation.

* :func:`extract_answer` takes the last ``\\boxed{...}`` (nested braces, ``\\boxed 5`` and ``\\fbox`` too),
  else the text after the last ``####``, after stripping any ``<think>...</think>`` block.
* :func:`answers_equal` uses math-verify when it is installed (``pip install t3s[math]``), else exact match
  after normalisation, then numeric comparison (``1,000`` == ``1000.0``, ``1/2`` == ``0.5``).
* :func:`get_verifier` returns the checker named in the config: ``auto``, ``exact``, ``numeric``,
  ``math_verify`` or a user function ``package.module:function`` taking ``(completion, gold) -> bool``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from fractions import Fraction

Verifier = Callable[[str, str], bool]

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, or None."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        best = text[i + 1 : j]
                        break
                j += 1
        elif m.group(0).startswith("\\boxed") and i < len(text):  # ``\boxed 5``
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                best = tok.group(0)
    return best


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: last ``\\boxed{}`` else text after the last ``####``; None if neither."""
    if text is None:
        return None
    text = _THINK.sub("", text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    return None


def normalize_answer(ans: str) -> str:
    """Minerva-style light normalisation: spaces, ``$``, ``\\text{}``, ``\\left/\\right``, trailing dot."""
    s = ans.strip()
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("$", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return s


def _to_number(s: str) -> Fraction | float | None:
    s = normalize_answer(s).replace(",", "")
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    if s.endswith("%"):
        s = s[:-1]
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        pass
    try:
        return float(s)
    except ValueError:
        return None


def _exact(pred: str, gold: str) -> bool:
    return normalize_answer(pred) == normalize_answer(gold)


def _numeric(pred: str, gold: str, rel_tol: float = 1e-6) -> bool:
    a, b = _to_number(pred), _to_number(gold)
    if a is None or b is None:
        return False
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = float(a), float(b)
    return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))


def _math_verify_available() -> bool:
    try:
        importlib.import_module("math_verify")
    except ImportError:
        return False
    return True


def _math_verify_equal(pred: str, gold: str) -> bool:
    import threading

    from math_verify import parse, verify

    # math-verify's own timeouts use signal.alarm, which only works in the main thread.
    kw = {} if threading.current_thread() is threading.main_thread() else {"parsing_timeout": None}
    vkw = {} if not kw else {"timeout_seconds": None}
    g = parse(f"${gold}$", **kw) or parse(gold, **kw)
    p = parse(f"${pred}$", **kw) or parse(pred, **kw)
    if not g or not p:
        return False
    return bool(verify(g, p, **vkw))


def answers_equal(pred: str | None, gold: str | None, *, method: str = "auto") -> bool:
    """Whether two extracted answers are equivalent (``method``: auto / exact / numeric / math_verify)."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if _exact(pred, gold):
        return True
    if method == "exact":
        return False
    if _numeric(pred, gold):
        return True
    if method == "numeric":
        return False
    if method in ("auto", "math_verify") and _math_verify_available():
        try:
            return _math_verify_equal(pred, gold)
        except Exception:  # a parser failure is a wrong answer, not a crash
            return False
    if method == "math_verify":
        raise ImportError("verifier 'math_verify' needs math-verify: pip install 't3s[math]'")
    return False


def gold_answer(answer: str) -> str:
    """The gold answer field may itself be a full solution: extract from it when it has a marker."""
    extracted = extract_answer(answer)
    return extracted if extracted is not None else str(answer).strip()


def check_completion(completion: str, gold: str, *, method: str = "auto") -> bool:
    """Extract the answer from ``completion`` and compare it with ``gold``."""
    return answers_equal(extract_answer(completion), gold_answer(gold), method=method)


def get_verifier(spec: str = "auto") -> Verifier:
    """A ``(completion, gold) -> bool`` checker from a config string."""
    if spec in ("auto", "exact", "numeric", "math_verify"):
        if spec == "math_verify" and not _math_verify_available():
            raise ImportError("accuracy.verifier=math_verify needs math-verify: pip install 't3s[math]'")
        return lambda completion, gold: check_completion(completion, gold, method=spec)
    if ":" not in spec:
        raise ValueError(f"verifier {spec!r}: expected auto, exact, numeric, math_verify or 'module:function'")
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"verifier {spec!r}: cannot import module {module_name!r} ({e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"verifier {spec!r}: {module_name} has no callable {func_name!r}")
    return lambda completion, gold: bool(func(completion, gold))
