"""The Hugging Face adapter as the FSDP2 root (gloo, 2 CPU processes): loss and every gradient equal the
single-process Hugging Face loss on the whole batch.

Each rank scores its half of the batch with ``normalizer`` = scored tokens of the whole batch, so the per-rank
losses sum to the global mean. FSDP2 averages gradients over ranks (divide factor = world size), so the gathered
gradient times the world size is the single-process gradient.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard) and gloo", allow_module_level=True)

WORLD = 2


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from t3s_kernels.hf import FusedLossCausalLM

        torch.manual_seed(0)
        cfg = transformers.Qwen3Config(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
        )
        model = transformers.Qwen3ForCausalLM(cfg)
        ref = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 97, (2 * WORLD, 9), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        n_scored = (labels[:, 1:] != -100).sum().float()

        lm = FusedLossCausalLM(model)
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(lm, mesh=mesh)  # the adapter is the root: the head weight is gathered inside its forward
        mine = slice(2 * rank, 2 * rank + 2)
        loss = lm(ids[mine], labels=labels[mine], normalizer=n_scored).loss
        loss.backward()

        ref_loss = ref(ids, labels=labels).loss
        ref_loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        errs, scales = {}, {}
        ref_params = dict(ref.named_parameters())
        for name, p in lm.model.named_parameters():
            full = p.grad.full_tensor() * WORLD
            errs[name] = (full - ref_params[name].grad).abs().max().item()
            scales[name] = ref_params[name].grad.abs().max().item()
        queue.put((rank, total.item(), ref_loss.item(), errs, scales))
    except Exception as exc:  # report instead of hanging the parent
        queue.put((rank, repr(exc)))
        dist.destroy_process_group()
        raise
    dist.barrier()  # no rank leaves before its peer is done: gloo can abort in teardown otherwise
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_fsdp2_root_adapter_matches_single_process():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in range(WORLD)]
    for p in procs:
        p.join(timeout=60)
    for res in results:
        assert len(res) == 5, f"rank {res[0]} failed: {res[1]}"
        _, total, ref_loss, errs, scales = res
        eps = torch.finfo(torch.float32).eps
        assert abs(total - ref_loss) <= 8 * eps * max(1.0, abs(ref_loss))
        for name, err in errs.items():
            # fp32 sums over a different split of the batch: a few ulps of the gradient's scale
            assert err <= 64 * eps * max(1.0, scales[name]), f"{name}: {err:.3e}"
