"""One rank of `t3s run` under a 2-process gloo group; optionally SIGKILLed in the middle of a stage.

    python _dist_run_worker.py RANK WORLD PORT CONFIG [KILL_STAGE]

With KILL_STAGE = train_<variant>, rank 1 kills itself (SIGKILL) at its second optimizer step of that stage.
"""

from __future__ import annotations

import os
import signal
import sys


def _die_in(stage: str) -> None:
    from t3s.pipeline import Pipeline
    from t3s.train import SFTRecipe

    real_stage, real_step = Pipeline.stage_train, SFTRecipe.train_step

    def stage_train(self, variant):
        if f"train_{variant}" == stage:
            steps = []

            def train_step(recipe, indices):
                steps.append(1)
                if len(steps) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_step(recipe, indices)

            SFTRecipe.train_step = train_step
        return real_stage(self, variant)

    Pipeline.stage_train = stage_train


def main(rank: int, world: int, port: int, config: str, kill_stage: str | None) -> int:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if kill_stage and rank == 1:
        _die_in(kill_stage)
    from t3s.cli import main as t3s_main

    return t3s_main(["run", config, "--no-progress", "distributed.backend=gloo", "runtime.threads=1"])


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                  sys.argv[5] if len(sys.argv) > 5 else None))
