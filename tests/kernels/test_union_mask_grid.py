"""Union-mask launcher grid (issue 8 review): documents must not sit on a CUDA grid axis capped at 65535."""

from __future__ import annotations

import pytest
import torch

from t3s_kernels._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

CUDA_AXIS_1_2_LIMIT = 65535


class _GridRecorder:
    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda **kwargs: self.grids.append(kwargs["n_chunks"])


@pytest.mark.parametrize("n_docs,max_blocks", [(70_000, 1), (200_000, 3), (5, 100_000)])
def test_any_number_of_documents_fits_the_cuda_grid(n_docs, max_blocks, monkeypatch):
    from t3s_kernels.block_diffusion import kernels as bd_kernels

    rec = _GridRecorder()
    monkeypatch.setattr(bd_kernels, "_union_mask_fwd_kernel", rec)
    i64 = torch.zeros(n_docs, dtype=torch.int64)
    t = torch.zeros(4)
    bd_kernels.union_mask_triton(
        torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.bool), None, None, i64, i64,
        torch.zeros(n_docs + 1, dtype=torch.int64), max_blocks, t, (t, t), None, torch.zeros(4, dtype=torch.int64), t,
        torch.zeros(4, dtype=torch.uint8), torch.zeros(4, 5, dtype=torch.int32), None,
        block_size=32, mask_token_id=0, seed=0, rng_base=0,
    )
    grid, n_chunks = rec.grids
    assert len(grid) == 1 and grid[0] <= 2**31 - 1  # only axis 0 is used: its limit is 2^31 - 1
    assert all(g <= CUDA_AXIS_1_2_LIMIT for g in grid[1:])
    nblk = min(1 << (max_blocks - 1).bit_length(), 1024 // 32)  # the launcher's blocks per program at block_size 32
    assert grid[0] == n_docs * n_chunks and n_chunks == -(-max_blocks // nblk)


def test_grid_beyond_axis_0_limit_is_a_clear_error():
    from t3s_kernels.block_diffusion.kernels import union_mask_grid

    with pytest.raises(ValueError, match="grid limit"):
        union_mask_grid(2**31, 2, 1)
    assert union_mask_grid(3, 10, 4) == ((9,), 3)
