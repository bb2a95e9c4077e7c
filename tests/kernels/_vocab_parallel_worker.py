"""Worker for the 2-process gloo vocabulary-parallel test: every case compares this rank's vocabulary-parallel
result (fp32, local weight shard) with the naive full-logits oracle of ``_lce_oracle`` (written from the
definitions, no library code) in float64 and in fp32 on the full weight; tolerance = 2 × the oracle's own fp32
error + a few fp32 ulps of the value's condition (``_lce_oracle.condition``: where a sum cancels, its terms'
size, not its result's, sets the rounding any fp32 computation makes)."""

from __future__ import annotations

import os
import sys
import traceback


def _close(name, got, sp32, ref64, failures, condition: float):
    import torch

    got, sp32, ref64 = got.double(), sp32.double(), ref64.double()
    scale = max(1.0, ref64.abs().max().item(), condition)
    err = (got - ref64).abs().max().item() if got.numel() else 0.0
    base = (sp32 - ref64).abs().max().item() if got.numel() else 0.0
    tol = 2 * base + 8 * torch.finfo(torch.float32).eps * scale
    if not (err <= tol) or not torch.isfinite(got).all():
        failures.append(f"{name}: err {err:.3e} > tol {tol:.3e} (single-process fp32 err {base:.3e})")


def run_case(case: dict, vp_cls, rank: int, world: int, failures: list, use_dtensor: bool) -> None:
    import torch

    from _lce_oracle import condition, naive_ce, naive_token_logprobs

    from t3s_kernels import linear_cross_entropy, token_logprobs

    g = torch.Generator().manual_seed(case["seed"])
    N, D, V = case["N"], case["D"], case["V"]
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64) * case.get("scale", 1.0)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) if case.get("bias") else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.25] = -100
    if case.get("all_ignored"):
        targets[:] = -100
    tw = (torch.rand(N, generator=g, dtype=torch.float64) * (torch.rand(N, generator=g) < 0.7)).float() \
        if case.get("token_weight") else None
    grads = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]
    vp = vp_cls.even(V)
    sl = slice(vp.vocab_start, vp.vocab_end)
    kind = case["kind"]
    kw = {k: case[k] for k in ("softcap", "temperature") if k in case}

    def compute(h, w, b, mode: str):
        """mode: 'full' (single process, full weight) or 'vp' (this rank's shard)."""
        h = h.clone().requires_grad_(True)
        w_full = w.clone().requires_grad_(True)
        b_full = b.clone().requires_grad_(True) if b is not None else None
        extra = {}
        if mode == "vp":
            if use_dtensor:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.tensor import Shard, distribute_tensor

                mesh = init_device_mesh("cpu", (world,))
                w_use = distribute_tensor(w.detach(), mesh, [Shard(0)]).requires_grad_(True)
                b_use = distribute_tensor(b.detach(), mesh, [Shard(0)]).requires_grad_(True) if b is not None else None
                leaves = (h, w_use, b_use)
            else:
                w_use = w[sl].clone().requires_grad_(True)
                b_use = b[sl].clone().requires_grad_(True) if b is not None else None
                extra["vocab_parallel"] = vp
                leaves = (h, w_use, b_use)
        else:  # the oracle: whole logits at the input dtype; fp32 gives the yardstick (PyTorch's own fp32 error)
            w_use, b_use = w_full, b_full
            leaves = (h, w_use, b_use)
            extra["matmul_dtype"] = extra["math_dtype"] = h.dtype
        y = targets
        if kind == "ce":
            red = case["reduction"]
            tw_ = tw.to(h.dtype) if tw is not None else None
            opts = dict(bias=b_use, token_weight=tw_, reduction=red, label_smoothing=case.get("label_smoothing", 0.0),
                        z_loss=case.get("z_loss", 0.0), **kw, **extra)
            out = naive_ce(h, w_use, y, **opts) if mode == "full" else linear_cross_entropy(h, w_use, y, **opts)
            outs = [out]
            obj = (out * grads[0].to(out.dtype)).sum() if red == "none" else out * 1.7
        else:
            if mode == "full":
                outs = list(naive_token_logprobs(h, w_use, y, bias=b_use, **kw, **extra))
            else:
                r = token_logprobs(h, w_use, y, bias=b_use, return_entropy=True, return_lse=True, **kw, **extra)
                outs = [r.logprob, r.entropy, r.lse]
            obj = sum((o * gg.to(o.dtype)).sum() for o, gg in zip(outs, grads))
        obj.backward()
        gr = []
        for t in leaves:
            if t is None:
                continue
            gt = t.grad
            if hasattr(gt, "to_local"):
                gt = gt.to_local()
            gr.append(gt if gt is not None else torch.zeros_like(t))
        return [o.detach() for o in outs], gr

    ref_o, ref_g = compute(hidden, weight, bias, "full")
    sp_o, sp_g = compute(hidden.float(), weight.float(), bias.float() if bias is not None else None, "full")
    vp_o, vp_g = compute(hidden.float(), weight.float(), bias.float() if bias is not None else None, "vp")
    def naive(h, w, b, **dt):
        if kind == "lp":
            return naive_token_logprobs(h, w, targets, bias=b, **kw, **dt)
        return naive_ce(h, w, targets, bias=b, token_weight=tw, reduction=case["reduction"],
                        label_smoothing=case.get("label_smoothing", 0.0), z_loss=case.get("z_loss", 0.0), **kw, **dt)

    upstream = grads if kind == "lp" else [grads[0] if case["reduction"] == "none" else torch.tensor(1.7)]
    cond = condition(naive, hidden, weight, bias, upstream, len(ref_o))
    name = case["name"] + (" [dtensor]" if use_dtensor else "")
    for i, (a, b64, c) in enumerate(zip(vp_o, ref_o, sp_o)):
        _close(f"{name} out{i}", a, c, b64, failures, cond[i])
    # gradients: hidden full; weight / bias: this rank's rows of the full gradient
    _close(f"{name} dhidden", vp_g[0], sp_g[0], ref_g[0], failures, cond[-3])
    _close(f"{name} dweight", vp_g[1], sp_g[1][sl], ref_g[1][sl], failures, cond[-2])
    if bias is not None:
        _close(f"{name} dbias", vp_g[2], sp_g[2][sl], ref_g[2][sl], failures, cond[-1])


CASES = [
    dict(name="mean", kind="ce", reduction="mean", seed=1, N=23, D=16, V=37, bias=True),
    dict(name="sum+smooth+zloss", kind="ce", reduction="sum", seed=2, N=19, D=12, V=41, label_smoothing=0.1,
         z_loss=1e-3),
    dict(name="none+weights", kind="ce", reduction="none", seed=3, N=21, D=16, V=37, token_weight=True, bias=True,
         label_smoothing=0.05),
    dict(name="mean+weights+softcap", kind="ce", reduction="mean", seed=4, N=17, D=8, V=29, token_weight=True,
         softcap=5.0, temperature=0.7),
    dict(name="huge logits", kind="ce", reduction="mean", seed=5, N=15, D=16, V=33, scale=300.0, z_loss=1e-4),
    dict(name="all ignored", kind="ce", reduction="mean", seed=6, N=9, D=8, V=31, all_ignored=True),
    dict(name="logprobs", kind="lp", seed=7, N=25, D=16, V=37, bias=True),
    dict(name="logprobs huge", kind="lp", seed=8, N=13, D=16, V=39, scale=100.0, temperature=1.3),
]


def main(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from t3s_kernels.linear_ce.vocab_parallel import VocabParallel

    failures: list[str] = []
    try:
        for case in CASES:
            run_case(case, VocabParallel, rank, world, failures, use_dtensor=False)
        for case in (CASES[0], CASES[6]):
            run_case(case, VocabParallel, rank, world, failures, use_dtensor=True)
    except Exception:
        failures.append(traceback.format_exc())
    dist.barrier()
    dist.destroy_process_group()
    if failures:
        print("\n".join(f"rank {rank}: {f}" for f in failures))
        sys.exit(1)
    print(f"rank {rank}: {len(CASES) + 2} cases ok")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
