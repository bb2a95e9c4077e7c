"""Token selection from a Δc store: which response tokens train, or which are dLLM targets.

Rules (``Δc = c(θb) − c(θ0)``, ``c = log p``; "masked" means weight 0 in the loss):

==================== =============================================================================================
``t3s``              AR T3S: anchors ``Δc > threshold`` (paper: threshold 0) are masked; the rest train.
``neg_t3s``          −T3S: the inverse; only the anchors train.
``dllm_targets``     dLLM T3S: targets ``B = {Δc < −tau}`` (paper: tau 0.2); weight 1 marks a target the
                     block-diffusion mask must always hide.
``static_high_conf`` mask the same fraction of tokens as T3S, chosen by the highest base-model confidence c(θ0).
``static_low_conf``  the same by the lowest base-model confidence.
``random``           the same fraction, chosen uniformly at random (seeded).
==================== =============================================================================================

The fraction-matched rules mask exactly as many tokens as T3S masks *after* every exemption (with
``always_train_eos`` the end tokens are exempt from them too, so the counts are equal; the paper's Appendix K
compares at "the same token fraction"). With an explicit ``fraction`` they mask ``round(fraction x tokens)``
(at most the non-exempt tokens). ``ranking`` says where the tokens are ranked: ``global`` (over the whole
dataset; the default) or ``per_sequence`` (each sequence masks as many as T3S masks in it, or its share of the
``fraction`` budget). The paper does not say which its "top-p" baselines use: the default is this library's
choice. Ties are broken by token order, so every rule is deterministic.

End-of-sequence and end-of-turn tokens: the paper says nothing about them. ``always_train_eos`` (the pipeline's
default, ``select.always_train_eos``) keeps them in the loss of every AR rule whatever their Δc: with the bare
Δc > 0 rule the demo's toy run masked every end token and the student stopped learning to stop. Either way the
stats record how many end tokens there are and what share of them the rule masked (``end_tokens``,
``end_selected_fraction``). For ``dllm_targets`` a target is trained more, not less, so end tokens follow Δc.

``quantile`` (optional) puts the anchor cut at a quantile of Δc instead of at ``threshold``.

A :class:`Selection` holds, per example, 0/1 weights over the example's scored positions (its label
positions), the rule's statistics, and the token ids it was computed on, so :func:`apply_selection` can refuse
examples that were tokenized differently.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from t3s.data import IGNORE_INDEX, TokenizedExample
from t3s.io import read_json, write_json_atomic, write_parquet_atomic
from t3s.profile import DELTA_FILE, Store, delta_confidence, load_delta

RANKINGS = ("global", "per_sequence")
RULES = ("t3s", "neg_t3s", "dllm_targets", "static_high_conf", "static_low_conf", "random")
AR_RULES = tuple(r for r in RULES if r != "dllm_targets")

SELECTION_FILE = "selection.parquet"
STATS_FILE = "selection.json"
SELECTION_FORMAT = "t3s.selection/1"


@dataclass
class Selection:
    """Per-example 0/1 weights over scored (label) positions, and their statistics.

    ``meaning`` is ``"loss_weight"`` for AR rules (1 = the token is in the loss) and ``"target"`` for
    ``dllm_targets`` (1 = always masked). ``stats`` holds the overall numbers (``selected_fraction`` = share
    of tokens the rule picked: masked for AR rules, targets for dLLM; ``weight_fraction`` = mean weight) and
    per-example fractions.
    """

    rule: str
    meaning: str
    ids: list[str]
    input_ids: list[list[int]]
    positions: list[np.ndarray]
    weights: list[np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    _by_id: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def weight_for(self, example_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions, weights) of one example."""
        i = self._index()[example_id]
        return self.positions[i], self.weights[i]

    def _index(self) -> dict[str, int]:
        if self._by_id is None:
            self._by_id = {example_id: i for i, example_id in enumerate(self.ids)}
        return self._by_id


def _ranked_mask(values: np.ndarray, count: int, *, highest: bool, eligible: np.ndarray) -> np.ndarray:
    """Boolean mask of the ``count`` highest (or lowest) eligible values; ties go to the earlier token."""
    idx = np.nonzero(eligible)[0]
    order = np.lexsort((idx, -values[idx] if highest else values[idx]))
    mask = np.zeros(values.size, dtype=bool)
    mask[idx[order[:count]]] = True
    return mask


def _random_mask(count: int, *, eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = np.nonzero(eligible)[0]
    mask = np.zeros(eligible.size, dtype=bool)
    mask[idx[rng.permutation(idx.size)[:count]]] = True
    return mask


def _apportion(budget: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``budget`` over groups in proportion to ``sizes`` (largest remainder: the parts sum to it)."""
    sizes = sizes.astype(np.int64)
    if budget == 0 or sizes.sum() == 0:
        return np.zeros(sizes.size, dtype=np.int64)
    exact = budget * sizes / sizes.sum()
    parts = np.floor(exact).astype(np.int64)
    parts[np.argsort(-(exact - parts), kind="stable")[: budget - int(parts.sum())]] += 1
    return parts


def _matched_mask(rule: str, *, base: np.ndarray, eligible: np.ndarray, counts: np.ndarray, offsets: np.ndarray,
                  ranking: str, seed: int) -> np.ndarray:
    """The ``static_*`` / ``random`` mask: ``counts[i]`` eligible tokens of group ``i`` (one group: global)."""
    rng = np.random.default_rng(seed)
    picked = np.zeros(base.size, dtype=bool)
    for i, count in enumerate(counts):
        lo, hi = (0, base.size) if ranking == "global" else (offsets[i], offsets[i + 1])
        if rule == "random":
            picked[lo:hi] = _random_mask(int(count), eligible=eligible[lo:hi], rng=rng)
        else:
            picked[lo:hi] = _ranked_mask(base[lo:hi], int(count), highest=rule == "static_high_conf",
                                         eligible=eligible[lo:hi])
    return picked


def _check_select_args(*, rule: str, tau: float, quantile: float | None, fraction: float | None, ranking: str,
                       always_train_eos: bool) -> None:
    """Raise a ValueError naming the first bad argument of :func:`select_tokens`."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0 (targets are Δc < −tau), got {tau}")
    if always_train_eos and rule == "dllm_targets":
        raise ValueError("always_train_eos applies to AR loss weights, not to dLLM targets")


def _as_delta_store(delta_store: Any) -> Store:
    """A Δc store from a folder, a loaded store, or a ``(base_store, bottleneck_store)`` pair."""
    if isinstance(delta_store, tuple | list) and len(delta_store) == 2:
        return delta_confidence(*delta_store)
    if isinstance(delta_store, Store):
        return delta_store
    return load_delta(delta_store)


def _selection_stats(*, rule: str, meaning: str, ids: list[str], picked: np.ndarray, weight: np.ndarray,
                     weights: list[np.ndarray], anchors: np.ndarray, cut: float, eos: list[int], is_end: np.ndarray,
                     counts: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    """The statistics :class:`Selection` records: overall, per example and on end-of-sequence tokens."""
    total = int(picked.size)
    per_example = [float(picked[offsets[i] : offsets[i + 1]].mean()) if counts[i] else 0.0 for i in range(len(counts))]
    return {
        "rule": rule,
        "meaning": meaning,
        "num_examples": len(ids),
        "num_tokens": total,
        "num_selected": int(picked.sum()),
        "selected_fraction": float(picked.mean()) if total else 0.0,
        "weight_fraction": float(weight.mean()) if total else 0.0,
        "anchor_fraction": float(anchors.mean()) if total else 0.0,
        "anchor_cut": cut,
        "end_token_ids": eos,
        "end_tokens": int(is_end.sum()),
        "end_selected": int((picked & is_end).sum()),
        "end_selected_fraction": float((picked & is_end).sum() / is_end.sum()) if is_end.any() else None,
        "per_example_selected_fraction": {
            "min": min(per_example, default=0.0),
            "mean": float(np.mean(per_example)) if per_example else 0.0,
            "max": max(per_example, default=0.0),
        },
        "per_example": dict(zip(ids, per_example, strict=True)),
        "examples_without_weight": [ids[i] for i, w in enumerate(weights) if meaning == "loss_weight" and w.size
                                    and not w.any()],
    }


def select_tokens(
    delta_store: Any,
    *,
    rule: str = "t3s",
    tau: float = 0.2,
    threshold: float = 0.0,
    quantile: float | None = None,
    fraction: float | None = None,
    seed: int = 0,
    always_train_eos: bool = False,
    eos_token_ids: Sequence[int] | None = None,
    end_token_ids: Sequence[int] = (),
    ranking: str = "global",
) -> Selection:
    """Select tokens from a Δc store.

    Args:
        delta_store: a Δc store folder (:func:`t3s.profile.delta_confidence` with ``out=``), a loaded
            :class:`~t3s.profile.Store`, or a ``(base_store, bottleneck_store)`` pair of profile stores.
        rule: one of :data:`RULES` (see the module docstring).
        tau: dLLM target severity: targets are ``Δc < −tau`` (paper: 0.2, about 5 % of tokens).
        threshold: anchors are ``Δc > threshold`` (paper: 0) for ``t3s`` / ``neg_t3s`` and for the fraction the
            matched baselines use.
        quantile: if given, the anchor cut is this quantile of all Δc instead of ``threshold`` (0.8 masks the
            20 % of tokens with the largest Δc).
        fraction: share of tokens the ``static_*`` / ``random`` rules mask (default: the T3S anchor fraction).
        seed: seed of the ``random`` rule.
        always_train_eos: AR rules only: end-of-sequence tokens keep weight 1 whatever the rule says.
        eos_token_ids: which ids count as end of sequence (default: recorded in the store's provenance).
        end_token_ids: extra end-of-turn ids (``<|im_end|>``, ``<|eot_id|>``) treated like EOS.
        ranking: ``global`` or ``per_sequence``: where the ``static_*`` / ``random`` rules rank tokens (a
            choice the paper leaves open; see the module docstring).

    Returns:
        :class:`Selection` with one weight array per example, aligned with the example's label positions.
    """
    _check_select_args(rule=rule, tau=tau, quantile=quantile, fraction=fraction, ranking=ranking,
                       always_train_eos=always_train_eos)
    store = _as_delta_store(delta_store)

    delta = store.flat("delta_c").astype(np.float64)
    base = store.flat("logprob_base").astype(np.float64)
    token_ids = store.flat("token_ids")
    counts = store.lengths("positions")
    total = int(delta.size)

    cut = float(np.quantile(delta, quantile)) if quantile is not None and total else threshold
    anchors = delta > cut
    eos = list(eos_token_ids) if eos_token_ids is not None else list(store.provenance.get("eos_token_ids", []))
    eos = sorted({int(i) for i in [*eos, *end_token_ids]})
    is_end = np.isin(token_ids, eos) if eos else np.zeros(total, dtype=bool)
    if always_train_eos and not eos:
        raise ValueError("always_train_eos needs eos_token_ids (none recorded in the store's provenance)")
    exempt = is_end if always_train_eos else np.zeros(total, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # the budget is what T3S masks after the exemptions, so every fraction-matched rule masks as many tokens
    t3s_masked = anchors & ~exempt
    target_fraction = fraction if fraction is not None else (float(anchors.mean()) if total else 0.0)
    sequence_of = np.repeat(np.arange(len(counts)), counts)
    if fraction is None:
        budget = int(t3s_masked.sum())
        per_sequence = np.bincount(sequence_of, weights=t3s_masked, minlength=len(counts)).astype(np.int64)
    else:
        budget = min(matched_fraction_count(fraction, total), int((~exempt).sum()))
        per_sequence = _apportion(budget, np.bincount(sequence_of, weights=~exempt, minlength=len(counts)))
    group_counts = np.asarray([budget]) if ranking == "global" else per_sequence

    meaning = "loss_weight"
    if rule == "t3s":
        picked = anchors
    elif rule == "neg_t3s":
        picked = ~anchors
    elif rule == "dllm_targets":
        picked = delta < -tau
        meaning = "target"
    else:
        picked = _matched_mask(rule, base=base, eligible=~exempt, counts=group_counts, offsets=offsets,
                               ranking=ranking, seed=seed)

    weight = picked.astype(np.float32) if meaning == "target" else (~picked).astype(np.float32)
    if always_train_eos:
        weight[is_end] = 1.0
        picked = weight == 0.0

    weights = [weight[offsets[i] : offsets[i + 1]] for i in range(len(counts))]
    positions = [store.column("positions", i).astype(np.int64) for i in range(len(counts))]
    ids = store.ids
    stats = _selection_stats(rule=rule, meaning=meaning, ids=ids, picked=picked, weight=weight, weights=weights,
                             anchors=anchors, cut=cut, eos=eos, is_end=is_end, counts=counts, offsets=offsets)
    params = {
        "rule": rule, "tau": tau, "threshold": threshold, "quantile": quantile, "fraction": fraction,
        "matched_fraction": target_fraction, "matched_count": budget, "ranking": ranking, "seed": seed,
        "always_train_eos": always_train_eos,
        "end_token_ids": eos,
        "delta_store": str(store.path) if store.path else None,
    }
    input_ids = store.table.column("input_ids").to_pylist()
    return Selection(rule=rule, meaning=meaning, ids=ids, input_ids=input_ids, positions=positions,
                     weights=weights, params=params, stats=stats)


def apply_selection(
    examples: Sequence[TokenizedExample], selection: Selection, *, strict: bool = True
) -> list[TokenizedExample]:
    """Attach a selection to tokenized examples for the trainer.

    AR selections set ``token_weight`` (aligned with ``labels``: the selection's 0/1 on scored positions, 0 on
    ``-100`` positions); dLLM selections set ``target_mask`` (1 on targets). An example whose id is not in the
    selection raises (``strict``) or keeps all its tokens; an example tokenized differently from the profiled
    one always raises.
    """
    by_id = selection._index()
    out = []
    for example in examples:
        i = by_id.get(example.id)
        if i is None:
            if strict:
                raise ValueError(f"example {example.id!r} is not in the selection (rule {selection.rule!r})")
            out.append(example)
            continue
        if list(example.input_ids) != list(selection.input_ids[i]):
            raise ValueError(
                f"example {example.id!r} is tokenized differently from the profiled one "
                f"({len(example.input_ids)} vs {len(selection.input_ids[i])} tokens); re-profile with the "
                "training tokenizer, chat template and truncation"
            )
        positions = selection.positions[i]
        labelled = np.nonzero(np.asarray(example.labels) != IGNORE_INDEX)[0]
        if not np.array_equal(labelled, positions):
            raise ValueError(f"example {example.id!r}: label positions differ from the profiled positions")
        dense = np.zeros(len(example), dtype=np.float32)
        dense[positions] = selection.weights[i]
        if selection.meaning == "target":
            out.append(replace(example, target_mask=dense.astype(np.int64).tolist()))
        else:
            out.append(replace(example, token_weight=dense.tolist()))
    return out


def save_selection(selection: Selection, out_dir: str | Path) -> Path:
    """Write ``selection.parquet`` (one row per example: ``id``, ``input_ids``, ``positions``, ``weight``,
    ``selected_fraction``) and ``selection.json`` (format, rule, meaning, params, stats); the JSON goes last
    and marks the folder complete."""
    out_dir = Path(out_dir)
    (out_dir / STATS_FILE).unlink(missing_ok=True)
    per_example = selection.stats.get("per_example", {})
    table = pa.table({
        "id": pa.array(selection.ids, pa.string()),
        "input_ids": pa.array(selection.input_ids, pa.list_(pa.int32())),
        "positions": pa.array([p.tolist() for p in selection.positions], pa.list_(pa.int32())),
        "weight": pa.array([w.tolist() for w in selection.weights], pa.list_(pa.float32())),
        "selected_fraction": pa.array([per_example.get(i, 0.0) for i in selection.ids], pa.float32()),
    })
    write_parquet_atomic(out_dir / SELECTION_FILE, table)
    write_json_atomic(out_dir / STATS_FILE, {
        "format": SELECTION_FORMAT, "rule": selection.rule, "meaning": selection.meaning,
        "params": selection.params, "stats": selection.stats,
    })
    return out_dir


def load_selection(path: str | Path) -> Selection:
    """Read a folder written by :func:`save_selection`."""
    path = Path(path)
    if not (path / STATS_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete selection: {STATS_FILE} is missing")
    meta = read_json(path / STATS_FILE)
    table = pq.read_table(path / SELECTION_FILE)
    return Selection(
        rule=meta["rule"],
        meaning=meta["meaning"],
        ids=table.column("id").to_pylist(),
        input_ids=table.column("input_ids").to_pylist(),
        positions=[np.asarray(p, dtype=np.int64) for p in table.column("positions").to_pylist()],
        weights=[np.asarray(w, dtype=np.float32) for w in table.column("weight").to_pylist()],
        params=meta["params"],
        stats=meta["stats"],
    )


def format_stats(selection: Selection) -> str:
    """One-line human summary of a selection."""
    s = selection.stats
    what = "targets" if selection.meaning == "target" else "masked"
    per = s["per_example_selected_fraction"]
    end = ""
    if s.get("end_tokens"):
        end = f"; end tokens {what}: {s['end_selected']}/{s['end_tokens']}"
    return (
        f"{selection.rule}: {s['num_selected']}/{s['num_tokens']} tokens {what} "
        f"({100 * s['selected_fraction']:.2f}%; per example min {100 * per['min']:.1f}% "
        f"mean {100 * per['mean']:.1f}% max {100 * per['max']:.1f}%) over {s['num_examples']} examples{end}"
    )


def add_select_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``t3s select``'s arguments to ``parser``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--delta", help="Δc store folder (from `t3s profile --delta-from` or delta_confidence)")
    source.add_argument("--base", help="θ0 profile store (with --bottleneck: Δc is computed here)")
    parser.add_argument("--bottleneck", help="θb profile store (with --base)")
    parser.add_argument(
        "--delta-out", default=None, help="where to write Δc computed from --base/--bottleneck (default <out>/delta)"
    )
    parser.add_argument("--rule", choices=RULES, default="t3s", nargs="+", help="one or more rules")
    parser.add_argument("--out", required=True, help="output folder (one subfolder per rule when several)")
    parser.add_argument("--tau", type=float, default=0.2, help="dLLM targets: Δc < −tau (default 0.2)")
    parser.add_argument("--threshold", type=float, default=0.0, help="anchors: Δc > threshold (default 0)")
    parser.add_argument("--quantile", type=float, default=None, help="anchor cut at this Δc quantile instead")
    parser.add_argument("--fraction", type=float, default=None, help="mask fraction of static/random rules")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rule")
    parser.add_argument("--ranking", choices=RANKINGS, default="global",
                        help="static/random rules: rank over the whole dataset or within each sequence")
    parser.add_argument("--always-train-eos", action="store_true", help="never mask end-of-sequence tokens")
    return parser


def select_main(args: Sequence[str] | argparse.Namespace | None = None) -> int:
    """``t3s select``: write one selection per ``--rule`` and print its statistics.

    Accepts an argv list (parsed here) or a Namespace built with :func:`add_select_arguments`.
    """
    if not isinstance(args, argparse.Namespace):
        parser = add_select_arguments(argparse.ArgumentParser(prog="t3s select", description=__doc__.split("\n")[0]))
        args = parser.parse_args(args)
    if args.base and not args.bottleneck:
        raise SystemExit("t3s select: --base needs --bottleneck")
    if args.delta:
        store = load_delta(args.delta)
    else:
        delta_out = args.delta_out or str(Path(args.out) / "delta")
        store = delta_confidence(args.base, args.bottleneck, out=delta_out)
        print(f"delta: {store.provenance['num_tokens']} tokens -> {delta_out} ({DELTA_FILE})")
    rules = args.rule if isinstance(args.rule, list) else [args.rule]
    for rule in rules:
        selection = select_tokens(
            store, rule=rule, tau=args.tau, threshold=args.threshold, quantile=args.quantile,
            fraction=args.fraction, seed=args.seed, always_train_eos=args.always_train_eos and rule != "dllm_targets",
            ranking=args.ranking,
        )
        out = Path(args.out) / rule if len(rules) > 1 else Path(args.out)
        save_selection(selection, out)
        print(f"{format_stats(selection)} -> {out}")
    return 0


def matched_fraction_count(fraction: float, total: int) -> int:
    """Tokens a fraction-matched rule masks out of ``total`` (rounded to nearest)."""
    return int(math.floor(fraction * total + 0.5))
