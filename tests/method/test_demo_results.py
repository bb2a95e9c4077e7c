"""The demo's own reporting: shock detection on a trajectory and the mean ± sd tables over seeds."""

from __future__ import annotations

import json
import math

import pytest

from t3s.demo.results import format_seed_tables, seed_summary, trajectory_shock


def _trajectory(tmp_path, accs):
    d = tmp_path / "trajectory"
    d.mkdir(parents=True)
    rows = [{"step": 2 * i, "loss": 1.0, **({"train_accuracy": a} if a is not None else {})}
            for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_trajectory_shock(tmp_path):
    t = trajectory_shock(_trajectory(tmp_path / "a", [0.5, 0.4, None, 0.1, 0.05, 0.3, 0.6]))
    assert t == {"start": 0.5, "min": 0.05, "min_step": 8, "last": 0.6, "shock": True}
    t = trajectory_shock(_trajectory(tmp_path / "b", [0.5, 0.45, 0.3, 0.6]))
    assert t["shock"] is False and t["min"] == 0.3  # 0.3 > 0.5 * 0.5: a dip, not a shock
    assert trajectory_shock(_trajectory(tmp_path / "c", [0.0, 0.0]))["shock"] is False
    with pytest.raises(ValueError, match="no training accuracy"):
        trajectory_shock(_trajectory(tmp_path / "d", [None]))


def _result(old_sft, new_sft, shock, anchors):
    acc = {"base": {"old": 1.0, "new": 0.0}, "sft": {"old": old_sft, "new": new_sft}}
    style = {m: {"old": {"teacher_b_boxed": 1.0 if m == "sft" else 0.0},
                 "new": {"teacher_b_boxed": 0.5 if m == "sft" else 0.0}} for m in acc}
    return {"models": ["base", "sft"], "families": ["old", "new"], "accuracy": acc, "style_share": style,
            "trajectory": {"start": 0.5, "min": 0.0 if shock else 0.4, "min_step": 30, "last": 0.9, "shock": shock},
            "anchor_fraction": anchors, "masked_fraction_t3s": anchors - 0.01, "bottleneck_step": 30}


def test_seed_summary_and_tables():
    res = {0: _result(0.8, 0.6, True, 0.30), 1: _result(0.6, 0.2, False, 0.20), 2: _result(0.7, 0.4, True, 0.25)}
    s = seed_summary(res)
    assert s["seeds"] == [0, 1, 2] and s["shock_seeds"] == 2
    m, sd = s["rows"]["sft"]["old"]
    assert m == pytest.approx(0.7) and sd == pytest.approx(0.1)  # sample sd (n - 1)
    assert s["rows"]["sft"]["b_style"][0] == pytest.approx(0.75)
    assert s["anchor_fraction"][0] == pytest.approx(0.25)
    table = format_seed_tables(res)
    assert "in 2/3" in table and "| SFT | 0.700 ± 0.100 | 0.400 ± 0.200 | 75 % |" in table
    assert "| 1 | no (0.50 → 0.40 @ 30 → 0.90) | 30 | 20.0 % | 1.00 / 0.00 | 0.60 / 0.20 |" in table
    one = seed_summary({5: _result(0.8, 0.6, True, 0.3)})
    assert one["rows"]["sft"]["new"] == (0.6, 0.0) and not math.isnan(one["anchor_fraction"][0])
