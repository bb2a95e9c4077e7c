"""Exact comparison of two ``UnionMaskOutput``s (backends must agree bit for bit)."""

import torch

FIELDS = ("noisy_ids", "loss_weight", "code", "t", "block_ptr", "block_counts", "doc_counts", "doc_weight_sum",
          "targets_dropped")  # fmt: skip


def assert_same(a, b):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        if name == "doc_weight_sum":  # a float sum: CUDA's index_add may add in another order
            torch.testing.assert_close(x.cpu(), y.cpu(), rtol=1e-6, atol=0)
        else:
            assert torch.equal(x.cpu(), y.cpu()), name
    assert (a.complement is None) == (b.complement is None)
    if a.complement is not None:
        for x, y in zip(a.complement, b.complement):
            assert torch.equal(x.cpu(), y.cpu())
