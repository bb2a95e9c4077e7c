"""Predicted beside measured: the cost model's ratios next to the GPU benchmark's, same commit, one table.

Joins ``cost_model.csv`` (kind ``predicted``) with the measured rows of ``linear_ce.csv`` and
``token_logprobs.csv`` taken on a GPU at the same commit (the newest such rows per shape): the measured ``full_x`` /
``fwd_x`` are ratios to the cuBLAS GEMMs timed in the same run, the predicted ones ratios to the same GEMMs at the
assumed rate, so the two columns compare like with like. Paths ↔ measured rows: ``trainer`` ↔ ``t3s`` variant
``w1`` (every token through ``token_weight``), ``mean`` ↔ ``t3s`` variant ``all``, ``w50`` ↔ ``t3s`` variant
``w50``, ``forward`` ↔ ``token_logprobs`` provider ``t3s`` (log-prob + entropy). The predicted column is the GPU
the rows were measured on (``h100`` / ``h200`` by device name). Rows go to ``bench/results/compare.csv``.

Example::

    python -m bench compare                       # after `python -m bench cost_model` and the GPU benchmarks
"""

from __future__ import annotations

import csv
from pathlib import Path

from bench.common import append_rows, base_parser, format_table, stamp

BENCH = "compare"
MEASURED = {  # path -> (file, provider, variant or None, measured ratio column)
    "trainer": ("linear_ce", "t3s", "w1", "full_x"),
    "mean": ("linear_ce", "t3s", "all", "full_x"),
    "w50": ("linear_ce", "t3s", "w50", "full_x"),
    "forward": ("token_logprobs", "t3s", None, "fwd_x"),
}


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _gpu_key(device: str) -> str | None:
    d = device.upper()
    return "h200" if "H200" in d else "h100" if "H100" in d else None


def compare(results_dir: str | Path) -> list[dict]:
    results_dir = Path(results_dir)
    predicted = [r for r in _read(results_dir / "cost_model.csv") if r.get("kind") == "predicted"]
    measured = {name: _read(results_dir / f"{name}.csv") for name in ("linear_ce", "token_logprobs")}
    rows = []
    for path, (file, provider, variant, col) in MEASURED.items():
        for m in measured[file]:
            gpu = _gpu_key(m.get("device", ""))
            if gpu is None or m.get("provider") != provider or (variant and m.get("variant") != variant):
                continue
            if m.get("status") != "ok" or not m.get(col):
                continue
            preds = [p for p in predicted if p["path"] == path and (p["N"], p["D"], p["V"]) == (m["N"], m["D"], m["V"])
                     and p.get(f"{gpu}_x")]
            same = [p for p in preds if p.get("commit") == m.get("commit")]
            pred = (same or preds or [None])[-1]
            rows.append({
                "bench": BENCH, "path": path, "N": m["N"], "D": m["D"], "V": m["V"], "gpu": m["device"],
                "measured_x": float(m[col]), "predicted_x": float(pred[f"{gpu}_x"]) if pred else float("nan"),
                "predicted_commit": pred.get("commit", "") if pred else "", "measured_commit": m.get("commit", ""),
                "measured_date": m.get("date", ""),
            })
    for r in rows:
        has_prediction = r["predicted_x"] == r["predicted_x"]  # not NaN
        r["measured_over_predicted"] = r["measured_x"] / r["predicted_x"] if has_prediction else ""
    return rows


def main(argv: list[str] | None = None) -> int:
    args = base_parser(BENCH, __doc__.splitlines()[0]).parse_args(argv)
    rows = compare(args.results_dir)
    if not rows:
        print("no GPU rows to compare yet (run the GPU benchmarks first: bench/gpu_check.sh)")
        return 0
    print(format_table(rows, ("path", "N", "D", "V", "gpu", "measured_x", "predicted_x", "measured_over_predicted")))
    if not args.no_save:
        meta = stamp()
        stamped = [dict(r, commit=meta["commit"], date=meta["date"]) for r in rows]
        print(f"\nappended {len(rows)} rows to {append_rows(BENCH, stamped, args.results_dir)}")
    return 0
