"""Linear (LM head) + softmax statistics without ``[N, V]`` logits: cross-entropy, log-probs, entropy, LSE.

File roles: ``reference.py`` (pure-autograd oracle), ``chunked.py`` (the GEMM-bound chunked path of every training
reduction, CUDA and CPU), ``kernels.py`` (Triton kernels and their host launchers), ``function.py`` (autograd
Functions, options dataclasses), ``api.py`` (public functionals:
validation, dispatch, reductions), ``modules.py`` (``nn.Module`` drop-ins holding options).
"""

from .api import TokenLogprobs, linear_cross_entropy, token_logprobs
from .modules import LinearCrossEntropyLoss, LinearTokenLogprobs
from .vocab_parallel import VocabParallel

__all__ = [
    "LinearCrossEntropyLoss",
    "LinearTokenLogprobs",
    "TokenLogprobs",
    "VocabParallel",
    "linear_cross_entropy",
    "token_logprobs",
]
