"""The demo's regime numbers: which tokens are the new skill's, and the same-size low-confidence Jaccard."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from t3s.demo.regime import _low_conf_jaccard, _token_roles  # noqa: E402
from t3s.demo.results import claim_check, format_regime  # noqa: E402


def _pieces(text: str) -> list[str]:
    from t3s.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]) + ["</s>"]


def test_chain_roles_mark_the_third_step_on():
    pieces = _pieces("13+13=26,26+13=39,39+25=64.\\boxed{64}")
    content, skill = _token_roles(pieces, "chain")
    assert [p for p, c in zip(pieces, content) if c] == "13 + 13 = 26 , 26 + 13 = 39 , 39 + 25 = 64".split()
    assert [p for p, s in zip(pieces, skill) if s] == [",", "39", "+", "25", "=", "64"]


def test_large_roles_mark_the_large_result_only():
    pieces = _pieces("29+15=44,44+25=69.\\boxed{69}")
    content, skill = _token_roles(pieces, "large")
    assert sum(content) == 11 and not any(content[pieces.index("\\boxed{"):])
    assert [i for i, s in enumerate(skill) if s] == [pieces.index("69")]  # the result, not the boxed copy


def test_low_conf_jaccard_same_size():
    base = np.array([-5.0, -0.1, -3.0, -0.2, -4.0, -0.01])
    eligible = np.array([True, True, True, True, True, False])  # the end token is left out
    masked = np.array([True, False, True, False, False, False])
    assert _low_conf_jaccard(masked, base, eligible) == pytest.approx(1 / 3)  # L = {0, 4}: one of three shared
    assert _low_conf_jaccard(np.array([True, False, False, False, True, False]), base, eligible) == 1.0


def test_claim_and_regime_line():
    def res(t3s, sft):
        return {"accuracy": {"t3s": {"new": t3s}, "sft": {"new": sft}}}

    c = claim_check({1: res(0.5, 0.4), 2: res(0.5, 0.4), 3: res(0.5, 0.4), 4: res(0.5, 0.4), 5: res(0.1, 0.6)})
    assert (c["wins"], c["holds"]) == (4, False)  # 4/5 wins, but the mean is 0.42 vs 0.44
    assert claim_check({1: res(0.5, 0.4), 2: res(0.5, 0.4), 3: res(0.5, 0.4), 4: res(0.5, 0.4),
                        5: res(0.4, 0.45)})["holds"]
    reg = {"content_nonpos": 0.8, "skill_nonpos": 0.9, "marker_masked": 1.0, "masked_fraction": 0.2,
           "jaccard_low_conf": 0.3, "loss0_kept": 0.5, "loss0_all": 0.9, "loss0_skill": 1.5,
           "curves": {"sft": [[0, 0.5], [8, 0.0]], "t3s": [[0, 0.5], [8, 0.6]]}}
    line = format_regime(reg)
    assert "Δc ≤ 0 80 %" in line and "0: 0.50 / 0.50, 8: 0.00 / 0.60" in line and "0.500 nats vs 0.900" in line


def test_curves_keep_first_and_last_and_at_most_nine_points():
    from t3s.demo.results import format_curves

    long = {"curves": {"sft": [[8 * i, 0.1] for i in range(26)], "t3s": [[8 * i, 0.2] for i in range(26)]}}
    points = format_curves(long).split(", ")
    assert points[0] == "0: 0.10 / 0.20" and points[-1] == "200: 0.10 / 0.20" and len(points) <= 9
    short = {"curves": {"sft": [[0, 0.5], [8, 0.0], [16, 0.4]], "t3s": [[0, 0.5], [8, 0.6]]}}
    assert format_curves(short) == "0: 0.50 / 0.50, 8: 0.00 / 0.60"  # only steps both runs measured
