"""The regime a demo run is in, measured before any comparison (issue 24).

T3S can only beat SFT on the new skill if (a) the new skill's tokens are *not* anchors (Δc ≤ 0 at θb), so T3S
keeps them, (b) its mask is not just "mask what θ0 is unsure of" (Jaccard with the same-size lowest-base-confidence
mask), and (c) the tokens it keeps still carry something to learn (θ0's loss on them is not near zero). This
module reads a finished run directory and the tokenizer and returns those numbers, plus the training-accuracy
curves of SFT and T3S (the paper's Fig. 8):

* ``content_nonpos``: share of the new family's equation tokens (numbers, ``+ - = ,`` before B's answer marker)
  with Δc ≤ 0;
* ``skill_nonpos``: the same over the new skill's own tokens (``chain``: the third equation onwards, its leading
  ``,`` included; ``large``: the result of the last equation, the sum above 2·hi);
* ``marker_masked``: share of B's answer markers (``\\boxed{``) that T3S masks;
* ``jaccard_low_conf``: |T ∩ L| / |T ∪ L|, T the tokens T3S masks, L the same number of tokens with the lowest
  c(θ0) (end tokens left out of both when the selection always trains them);
* ``loss0_kept`` / ``loss0_all``: θ0's mean loss −c(θ0) over the tokens T3S trains / over every response token:
  the loss each run starts from, over the whole training set;
* ``curves``: training accuracy per evaluation step, of the SFT trajectory and of the T3S run.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MARKER = "\\boxed{"
_EQUATION_TOKEN = re.compile(r"\d+|[+\-=,]")


def _token_roles(pieces: list[str], new_skill: str) -> tuple[list[bool], list[bool]]:
    """Per token: is it an equation token before B's marker; is it one of the new skill's own tokens."""
    content, skill = [False] * len(pieces), [False] * len(pieces)
    end = pieces.index(MARKER) if MARKER in pieces else len(pieces)
    equation, after_equals, last_result = 0, False, None
    for i, piece in enumerate(pieces[:end]):
        if not _EQUATION_TOKEN.fullmatch(piece):
            continue
        content[i] = True
        if new_skill == "chain" and equation >= 2:
            skill[i] = True  # the ',' that goes on with one more step included
        if after_equals and piece.isdigit():
            last_result, equation, after_equals = i, equation + 1, False
        elif piece == "=":
            after_equals = True
    if new_skill == "large" and last_result is not None:
        skill[last_result] = True
    return content, skill


def _low_conf_jaccard(masked: np.ndarray, base: np.ndarray, eligible: np.ndarray) -> float:
    """Jaccard of ``masked`` with the same number of ``eligible`` tokens of lowest base confidence."""
    k = int(masked.sum())
    idx = np.flatnonzero(eligible)
    low = np.zeros_like(masked)
    low[idx[np.argsort(base[idx], kind="stable")[:k]]] = True
    union = int((masked | low).sum())
    return float((masked & low).sum() / union) if union else float("nan")


def _curve(path: Path) -> list[list[float]]:
    from t3s.report import read_metrics

    return [[r["step"], r["train_accuracy"]] for r in read_metrics(path) if r.get("train_accuracy") is not None]


def measure_regime(run_dir: str | Path, tokenizer, *, new_skill: str, threshold: float = 0.0,
                   always_train_eos: bool = True) -> dict:
    """The regime numbers of one finished run (see the module docstring)."""
    from t3s.profile import load_delta

    run = Path(run_dir)
    store = load_delta(run / "delta")
    delta = store.flat("delta_c").astype(np.float64)
    base = store.flat("logprob_base").astype(np.float64)
    token_ids = store.flat("token_ids")
    eos = list(store.provenance.get("eos_token_ids", []))
    is_end = np.isin(token_ids, eos) if eos else np.zeros(delta.size, dtype=bool)
    masked = (delta > threshold) & ~(is_end if always_train_eos else False)

    content = np.zeros(delta.size, dtype=bool)
    skill = np.zeros(delta.size, dtype=bool)
    offset = 0
    for row, (rid, n) in enumerate(zip(store.ids, store.lengths("positions"), strict=True)):
        if "-new-" in rid:
            pieces = tokenizer.convert_ids_to_tokens(store.column("token_ids", row).tolist())
            c, s = _token_roles(pieces, new_skill)
            content[offset : offset + n], skill[offset : offset + n] = c, s
        offset += n
    marker = token_ids == tokenizer.convert_tokens_to_ids(MARKER)

    def share(sel: np.ndarray, of: np.ndarray) -> float:
        return float(of[sel].mean()) if sel.any() else float("nan")

    return {
        "content_nonpos": share(content, delta <= threshold),
        "skill_nonpos": share(skill, delta <= threshold),
        "skill_tokens": int(skill.sum()),
        "marker_masked": share(marker, masked),
        "jaccard_low_conf": _low_conf_jaccard(masked, base, ~is_end if always_train_eos else np.ones_like(masked)),
        "masked_fraction": float(masked.mean()),
        "loss0_kept": float(-base[~masked].mean()),
        "loss0_all": float(-base.mean()),
        "loss0_skill": float(-base[skill].mean()) if skill.any() else float("nan"),
        "curves": {"sft": _curve(run / "trajectory" / "metrics.jsonl"),
                   "t3s": _curve(run / "variants" / "t3s" / "metrics.jsonl")},
    }
