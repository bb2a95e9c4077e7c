"""Profiling under ``torchrun``: two CPU ranks (gloo) split the examples and merge into one store that equals a
single-process profile. Also the single-process behaviour of the ``t3s.distributed`` helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from profile_fixtures import tiny_model, tiny_records, tiny_tokenizer

from t3s import distributed
from t3s.profile import load_scores, profile_confidence

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from profile_fixtures import tiny_model, tiny_records, tiny_tokenizer
    import t3s.profile as profile_module
    from t3s import distributed
    from t3s.profile import profile_confidence

    scored = []  # which examples this rank scored
    real_score_part = profile_module._score_part

    def spy(model, examples, indices, **kwargs):
        scored.extend(int(i) for i in indices)
        return real_score_part(model, examples, indices, **kwargs)

    profile_module._score_part = spy
    out = Path(sys.argv[1])
    assert distributed.init_distributed() and distributed.world_size() == 2
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))  # seeded: every rank builds the same weights
    store = profile_confidence(model, tok, tiny_records(8), out / "store", part_tokens=150, progress=False)
    mine = distributed.shard(list(range(8)))
    everyone = distributed.all_gather_object(mine)
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(
        {"rank": distributed.rank(), "main": distributed.is_main(), "shard": mine, "all": everyone, "scored": scored,
         "store": str(store)}))
    distributed.cleanup()
    """
)


def test_helpers_in_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.all_gather_object("x") == ["x"] and distributed.broadcast_object(5) == 5
    distributed.barrier()
    distributed.cleanup()


@pytest.mark.distributed
def test_two_gloo_ranks_split_examples_and_merge_one_store(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["main"] for r in ranks] == [True, False]
    assert ranks[0]["shard"] == [0, 2, 4, 6] and ranks[1]["shard"] == [1, 3, 5, 7]
    assert ranks[0]["all"] == ranks[1]["all"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # Both ranks did work, and together they scored every example exactly once.
    assert ranks[0]["scored"] and ranks[1]["scored"]
    assert sorted(ranks[0]["scored"] + ranks[1]["scored"]) == list(range(8))

    merged = load_scores(tmp_path / "store")
    assert merged.provenance["world_size"] == 2
    assert not (tmp_path / "store" / "parts").exists()
    tok = tiny_tokenizer()
    single = load_scores(profile_confidence(tiny_model(len(tok)), tok, tiny_records(8), tmp_path / "single",
                                            progress=False))
    assert merged.ids == single.ids
    np.testing.assert_allclose(merged.flat("logprob"), single.flat("logprob"), atol=1e-5)
    assert merged.provenance["model_hash"] == single.provenance["model_hash"]
