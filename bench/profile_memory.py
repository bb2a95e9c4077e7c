"""Δc_t profiling peak CPU memory: fused (hidden states + token_logprobs) vs Hugging Face logits.

The model has a tiny hidden size (D = 64, one layer) and the real Qwen vocabulary (V = 151936), so the LM-head
output dominates: one fp32 ``[tokens x V]`` logits tensor is 19 GB at 32768 tokens. The two paths:

* ``fused`` — :func:`t3s.profile.score_batch`, the profiler's own code: trunk hidden states, then
  ``token_logprobs`` from the LM-head weight; no logits tensor;
* ``logits`` — the usual Hugging Face way: ``model(...).logits``, ``log_softmax``, ``gather``.

Each (path, size) runs in a fresh subprocess through :func:`bench.common.cpu_peak_mb`, which builds the model and
inputs (plus a small warm-up pass), resets the resident-set high-water mark, runs the case and reports the peak
above that point, so imports and set-up are not counted against either path.

    python -m bench profile_memory                 # full run: 32768 tokens
    python -m bench profile_memory --smoke         # 1024 tokens, two cases in parallel (CI)
    python -m bench profile_memory --tokens 4096 32768

The logits path is reported as skipped, with the reason, when the memory it needs (about two logits tensors:
the logits and their log-softmax) is above what the machine has available (``--max-gb``; default 90 % of
``MemAvailable``). Rows go to ``bench/results/profile_memory.csv``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import append_rows, base_parser, cpu_peak_mb, format_table, stamp

NAME = "profile_memory"
PATHS = ("fused", "logits")
MB = 2**20


def logits_bytes(tokens: int, vocab: int) -> int:
    """Size of one fp32 ``[tokens x vocab]`` tensor."""
    return tokens * vocab * 4


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------------------
# The case, run inside the child process by bench.common.cpu_peak_mb
# --------------------------------------------------------------------------------------------------------


def _build_model(vocab: int, hidden: int, layers: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=65536,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config).eval()


def _run_path(model, path: str, input_ids, labels):
    import torch

    with torch.no_grad():
        if path == "fused":
            from t3s.profile import score_batch

            return score_batch(model, input_ids, labels)[0]
        logits = model(input_ids=input_ids).logits  # [1, N, V]: what the fused path never builds
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = labels[:, 1:]
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return torch.where(targets != -100, picked, 0.0)


def case(path: str, tokens: int, vocab: int, hidden: int, layers: int) -> Callable[[], object]:
    """Set up one measurement (model, inputs, warm-up) and return the call whose peak is measured."""
    import torch

    model = _build_model(vocab, hidden, layers)
    gen = torch.Generator().manual_seed(1)
    warm = torch.randint(0, vocab, (1, 64), generator=gen)
    _run_path(model, path, warm, warm)  # load kernels and allocator pools before the high-water reset
    input_ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels = input_ids.clone()
    labels[:, : tokens // 8] = -100  # a prompt, as in a real trace
    return lambda: _run_path(model, path, input_ids, labels)


# --------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------


def build_parser():
    parser = base_parser(NAME, __doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="trace lengths (default 32768)")
    parser.add_argument("--smoke", action="store_true", help="one small size (1024 tokens) for CI")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--parallel", type=int, default=None,
                        help="measurements at once (default 2 with --smoke, else 1: big cases need the memory)")
    parser.add_argument("--max-gb", type=float, default=None,
                        help="skip the logits path above this need (default: 90%% of available memory)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    return parser


def run(argv: list[str] | None = None) -> list[dict]:
    """Measure and return the result rows (also printed, and appended to the CSV unless ``--no-save``)."""
    args = build_parser().parse_args(argv)
    sizes = args.tokens or ([1024] if args.smoke else [32768])
    available = _available_bytes()
    budget = args.max_gb * 2**30 if args.max_gb else (0.9 * available if available else float("inf"))
    os.environ["BENCH_CPU_THREADS"] = str(args.threads)  # read by the measuring child

    rows, jobs = [], []
    for tokens in sizes:
        for path in args.paths:
            row = {"path": path, "tokens": tokens, "vocab": args.vocab, "hidden": args.hidden,
                   "layers": args.layers, "logits_mb": logits_bytes(tokens, args.vocab) / MB}
            need = 2.2 * logits_bytes(tokens, args.vocab)  # logits + their log-softmax + slack
            if path == "logits" and need > budget:
                row["status"] = f"skipped: needs ~{need / 2**30:.0f} GiB, budget {budget / 2**30:.0f} GiB"
            else:
                jobs.append(row)
            rows.append(row)

    def measure(row: dict) -> dict:
        kwargs = {k: row[k] for k in ("path", "tokens", "vocab", "hidden", "layers")}
        return cpu_peak_mb(f"bench.{NAME}:case", timeout=args.timeout, **kwargs)

    with ThreadPoolExecutor(max_workers=args.parallel or (2 if args.smoke else 1)) as pool:
        for row, result in zip(jobs, pool.map(measure, jobs), strict=True):
            row.update(result)
    info = stamp("cpu")
    for row in rows:
        row.update(info)
    print(format_table(rows, ["path", "tokens", "vocab", "status", "peak_mb", "logits_mb", "wall_ms", "method"]))
    if not args.no_save:
        append_rows(NAME, rows, args.results_dir)
    return rows


def main(argv: list[str] | None = None) -> int:
    rows = run(argv)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
