"""Small helpers for running under ``torchrun`` (one process per GPU, or several CPU processes with gloo).

Everything here also works in a plain single process: ``rank() == 0``, ``world_size() == 1``, ``barrier()``
is a no-op and ``shard(items)`` returns all items. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init_distributed` reads them.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` (or an equivalent launcher) with more than one rank."""
    return _env_int("WORLD_SIZE", 1) > 1


def init_distributed(backend: str | None = None, *, timeout_s: float | None = None) -> bool:
    """Join the process group described by the ``torchrun`` environment, if there is one.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default ``nccl`` when CUDA is available, else ``gloo``.
        timeout_s: collective timeout; long profiling shards may need more than torch's default.

    Returns:
        ``True`` when running with more than one rank (the group is initialised), ``False`` otherwise.
        Calling it again is harmless. On CUDA the current device is set to ``LOCAL_RANK``.
    """
    if not launched_distributed():
        return False
    if dist.is_initialized():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(**kwargs)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (from the launcher's environment until the group is initialised)."""
    if is_distributed():
        return dist.get_rank()
    return _env_int("RANK", 0) if launched_distributed() else 0


def world_size() -> int:
    """Number of ranks (from the launcher's environment until the group is initialised)."""
    if is_distributed():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1) if launched_distributed() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0, the process that writes shared outputs and logs."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank`` (round-robin).

    Round-robin keeps ranks balanced when ``items`` is sorted by cost (e.g. by sequence length).
    """
    return list(items[rank() :: world_size()])


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (so all ranks take the same branch)."""
    return all(all_gather_object(bool(flag)))


def cleanup(*, sync: bool = True) -> None:
    """Leave the process group (no-op when none was joined).

    ``sync`` first waits for every rank: a gloo rank whose peer has already exited can abort in teardown
    ("terminate called without an active exception"). Pass ``sync=False`` after an error, when the other ranks
    may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()
