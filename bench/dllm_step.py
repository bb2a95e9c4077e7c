"""Block-diffusion training step (union mask + 2L forward + loss + backward): fused loss vs materialised logits.

GPU (default): a Qwen3-architecture model built from a config (no download; ``--hidden 1024 --layers 4``, vocab
151936, bf16), one sequence of ``--seq-len 2048 4096`` tokens (model input 2L), block 32, 15 % targets,
attention ``sdpa`` (dense 4D boolean mask) and ``flex_attention`` (BlockMask). Providers:

* ``fused``: :func:`t3s.dllm.dllm_train_step` — x_t hidden states straight into
  :func:`t3s_kernels.linear_cross_entropy` with the union-mask weights; no ``[L, V]`` logits;
* ``materialised``: the same step with ``lm_head(hidden).float()`` + weighted ``F.cross_entropy`` (the
  dFactory / Hugging Face path).

Rows: p20/p50/p80 ms of forward + backward and peak CUDA memory above the model's own (weights + grads).

CPU smoke (``--cpu``, runs in CI): a tiny Llama, L = 64, time and peak RSS (fresh process per case).

Examples::

    python -m bench dllm_step
    python -m bench dllm_step --seq-len 8192 --attn flex_attention
    python -m bench dllm_step --cpu --no-save
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from bench.common import append_rows, base_parser, cpu_peak_mb, cuda_peak_mb, format_table, guarded, stamp, time_ms

BENCH = "dllm_step"
MASK_ID = 151000


def build_model(arch: str, hidden: int, layers: int, vocab: int, attn: str, dtype, device):
    import transformers

    heads = max(1, hidden // 64)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=32768,
                  attn_implementation=attn)  # fmt: skip
    if arch == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=64, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return model.to(device=device, dtype=dtype)


def make_batch(L: int, vocab: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, MASK_ID) - 1, (1, L), generator=g)
    labels = ids.clone()
    labels[:, : L // 8] = -100
    targets = (torch.rand(1, L, generator=g) < 0.15) & (labels != -100)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "target_mask": targets.to(device)}


def step_fn(provider: str, model, batch, cfg):
    from t3s.dllm import dllm_train_step, prepare_dllm_batch, x_t_hidden_states

    if provider == "fused":

        def run():
            dllm_train_step(model, batch, cfg, step=1).loss.backward()

        return run
    attn = model.config._attn_implementation
    p0 = next(model.parameters())

    def run():
        p = prepare_dllm_batch(batch, cfg, step=1, attn_implementation=attn, dtype=p0.dtype, device=p0.device)
        h = x_t_hidden_states(model, p)
        logits = model.get_output_embeddings()(h).float()
        ce = F.cross_entropy(logits.flatten(0, 1), p.input_ids.flatten(), reduction="none")
        loss = (ce * p.union.loss_weight.flatten()).sum() / p.maskable.sum()
        loss.backward()

    return run


def _cpu_case(provider: str, seq_len: int):
    """``bench.common.cpu_peak_mb`` target: set up a tiny model, return the step callable."""
    from t3s.dllm import DLLMConfig

    model = build_model("llama", 64, 2, 32000, "sdpa", torch.float32, "cpu")
    batch = make_batch(seq_len, 32000, "cpu")
    return step_fn(provider, model, batch, DLLMConfig(mask_token_id=31999, block_size=8))


def main(argv: list[str] | None = None) -> int:
    p = base_parser(BENCH, __doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="CPU smoke mode")
    p.add_argument("--seq-len", type=int, nargs="+", default=None)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--arch", choices=("qwen3", "llama"), default="qwen3")
    p.add_argument("--attn", nargs="+", default=["sdpa", "flex_attention"])
    p.add_argument("--block-size", type=int, default=32)
    a = p.parse_args(argv)
    from t3s.dllm import DLLMConfig

    cuda = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda" if cuda else "cpu")
    rows = []
    if not cuda:
        L = (a.seq_len or [64])[0]
        base = {**stamp(device), "arch": "llama-tiny", "seq_len": L, "attn": "sdpa"}
        for provider in ("fused", "materialised"):
            run = _cpu_case(provider, L)
            t, status = guarded(lambda run=run: time_ms(run, device=device, budget_ms=300, max_rep=5))
            mem = cpu_peak_mb("bench.dllm_step:_cpu_case", provider=provider, seq_len=L)
            row = {**base, "provider": provider, "status": status if mem["status"] == "ok" else mem["status"],
                   "peak_mb": mem["peak_mb"]}  # fmt: skip
            if t is not None:
                row.update(p20_ms=t.p20, p50_ms=t.p50, p80_ms=t.p80)
            rows.append(row)
    else:
        cfg = DLLMConfig(mask_token_id=MASK_ID, block_size=a.block_size, eps_min=1e-3, eps_max=1.0)
        for attn in a.attn:
            model = build_model(a.arch, a.hidden, a.layers, a.vocab, attn, torch.bfloat16, device)
            n_params = sum(x.numel() for x in model.parameters())
            for L in a.seq_len or [2048, 4096]:
                batch = make_batch(L, a.vocab, device)
                base = {**stamp(device), "arch": a.arch, "hidden": a.hidden, "layers": a.layers, "vocab": a.vocab,
                        "params_m": n_params / 1e6, "seq_len": L, "attn": attn}  # fmt: skip
                for provider in ("fused", "materialised"):
                    run = step_fn(provider, model, batch, cfg)

                    def setup(model=model):
                        model.zero_grad(set_to_none=False)

                    run()  # allocate grads once, so peak memory excludes them
                    t, status = guarded(lambda run=run, setup=setup: time_ms(run, setup=setup, device=device))
                    row = {**base, "provider": provider, "status": status}
                    if t is not None:
                        row.update(p20_ms=t.p20, p50_ms=t.p50, p80_ms=t.p80)
                        mem, st = guarded(lambda run=run: cuda_peak_mb(run, device))
                        row["peak_mb"] = mem if mem is not None else float("nan")
                    rows.append(row)
                    gc.collect()
                    torch.cuda.empty_cache()
            del model
            gc.collect()
            torch.cuda.empty_cache()
    print(format_table(rows, ["attn", "seq_len", "provider", "p50_ms", "peak_mb", "status"]))
    if not a.no_save:
        print("appended to", append_rows(BENCH, rows, a.results_dir))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
