"""Vocabulary-parallel LM head: 2 gloo processes, each holding half the vocabulary, equal a single process.

Losses (mean / sum / none with a random per-token upstream gradient, token weights, label smoothing, z-loss,
softcap + temperature, huge logits, an all-ignored batch), log-probs / entropy / LSE with random upstream
gradients, and every gradient (hidden, the local weight shard, the local bias shard); also through a ``DTensor``
weight sharded on dim 0. See ``_vocab_parallel_worker.py`` for the tolerance rule.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t3s_kernels import VocabParallel, linear_cross_entropy, token_logprobs

WORKER = Path(__file__).parent / "_vocab_parallel_worker.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_rank_vocab_parallel_matches_single_process():
    port = _port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    assert all("cases ok" in o for o in outs)


def test_vocab_parallel_option_validation():
    with pytest.raises(ValueError, match="vocab_start"):
        VocabParallel(None, 5, 3, 10)
    with pytest.raises(TypeError, match="vocab_end"):
        VocabParallel(None, 0, 2.0, 10)
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="weight has 5 rows"):
        linear_cross_entropy(h, w, y, vocab_parallel=VocabParallel(None, 0, 4, 8))
    with pytest.raises(TypeError, match="vocab_parallel must be a VocabParallel"):
        token_logprobs(h, w, y, vocab_parallel=(0, 5))
    with pytest.raises(ValueError, match=r"targets must be in \[0, V=8\)"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 8]), vocab_parallel=VocabParallel(None, 0, 5, 8))
