"""Worker for the 2-process gloo test: one training run with an accuracy hook, under FSDP2 or DDP."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def hooks(pipe):
    """Training accuracy (generation) and the anchor/other diagnostics with gradient statistics."""
    from t3s.diagnostics import GroupDynamics

    probe = pipe.examples[:4]
    anchors = [[j % 3 == 0 for j in range(len(e.labels))] for e in probe]
    return [pipe.accuracy_hook(use_curve=False), GroupDynamics(probe, anchors, grad_stats=True)]


def main(rank: int, world: int, port: int, root: str, run_dir: str, strategy: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny import tiny_config

    from t3s import distributed as D
    from t3s.pipeline import Pipeline
    from t3s.train import run_training

    cfg = tiny_config(Path(root), Path(run_dir), f"distributed.strategy={strategy}", "distributed.backend=gloo",
                      "bottleneck.method=argmin")
    pipe = Pipeline(cfg, progress=False, log=lambda s: None)
    run_training(cfg, pipe.examples, Path(run_dir) / strategy, evaluate=hooks(pipe), track_bottleneck=True,
                 progress=False)
    D.cleanup()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
