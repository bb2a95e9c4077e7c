"""t3s_kernels: fused Triton kernels for LLM losses and per-token statistics without ``[tokens x vocab]`` logits.

One per-token primitive (log-sum-exp, target logit, entropy straight from hidden states and the LM-head weight)
serves every loss: :func:`linear_cross_entropy` (masked / weighted cross-entropy) and :func:`token_logprobs`
(per-token log-probs, entropy, LSE). :func:`block_diffusion_union_mask` draws block-diffusion masks with T3S
union masking. Every public op takes ``impl="auto" | "triton" | "reference"``.
"""

__version__ = "0.1.0"

from t3s_kernels.block_diffusion import (  # noqa: E402
    UnionMaskOutput,
    block_diffusion_attention_mask,
    block_diffusion_block_mask,
    block_diffusion_mask_mod,
    block_diffusion_union_mask,
)
from t3s_kernels.hf import FusedLossCausalLM  # noqa: E402
from t3s_kernels.linear_ce import (  # noqa: E402
    LinearCrossEntropyLoss,
    LinearTokenLogprobs,
    TokenLogprobs,
    VocabParallel,
    linear_cross_entropy,
    token_logprobs,
)

__all__ = [
    "FusedLossCausalLM",
    "LinearCrossEntropyLoss",
    "LinearTokenLogprobs",
    "TokenLogprobs",
    "UnionMaskOutput",
    "VocabParallel",
    "__version__",
    "block_diffusion_attention_mask",
    "block_diffusion_block_mask",
    "block_diffusion_mask_mod",
    "block_diffusion_union_mask",
    "linear_cross_entropy",
    "token_logprobs",
]
