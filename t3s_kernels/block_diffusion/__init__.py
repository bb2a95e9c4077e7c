"""Block diffusion (BD3-LM / LLaDA2.0 style) with T3S union masking.

* :func:`block_diffusion_union_mask` — one pass over the tokens: noisy ids, loss weights, class codes, noise
  levels and counts (Triton on CUDA, a C++ op on CPU, a pure-PyTorch reference everywhere).
* :func:`block_diffusion_attention_mask` / :func:`block_diffusion_mask_mod` / :func:`block_diffusion_block_mask`
  — the ``[x_t ‖ x_0]`` 2L attention mask (dense reference, FlexAttention).

Files: ``kernels.py`` (Triton), ``cpu.py`` (loads ``csrc/union_mask.cpp``), ``api.py`` (public op),
``reference.py`` (oracle, Philox in PyTorch), ``attention.py`` (masks).
"""

from t3s_kernels.block_diffusion.api import (
    COUNT_COLUMNS,
    ComplementView,
    UnionMaskOutput,
    block_diffusion_union_mask,
)
from t3s_kernels.block_diffusion.attention import (
    block_diffusion_attention_mask,
    block_diffusion_block_mask,
    block_diffusion_mask_mod,
    document_ids_from_cu_seqlens,
    position_ids_from_document_ids,
)
from t3s_kernels.block_diffusion.reference import (
    CODE_NAMES,
    FORCED,
    PAD,
    PROMPT,
    RANDOM,
    RANDOM_TARGET,
    VISIBLE,
)

__all__ = [
    "CODE_NAMES",
    "COUNT_COLUMNS",
    "FORCED",
    "PAD",
    "PROMPT",
    "RANDOM",
    "RANDOM_TARGET",
    "VISIBLE",
    "ComplementView",
    "UnionMaskOutput",
    "block_diffusion_attention_mask",
    "block_diffusion_block_mask",
    "block_diffusion_mask_mod",
    "block_diffusion_union_mask",
    "document_ids_from_cu_seqlens",
    "position_ids_from_document_ids",
]
