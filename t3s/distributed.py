"""Small helpers for running under ``torchrun`` (one process per GPU, or several CPU processes with gloo).

Everything here also works in a plain single process: ``rank() == 0``, ``world_size() == 1``, ``barrier()``
is a no-op and ``shard(items)`` returns all items. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init_distributed` reads them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from t3s.io import RunFault

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
    _PEERS[:] = all_gather_object((socket.gethostname(), os.getpid()))  # to name a rank that dies later
    return True


_PEERS: list[tuple[str, int]] = []
"""``(host, process id)`` of every rank, in rank order, gathered when the group is initialised."""


class RankLost(RunFault):
    """Another rank died or stopped answering; this rank stops too (a re-run resumes)."""


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a killed process not yet reaped by its parent, a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state after the command name in /proc/PID/stat
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def dead_ranks() -> list[int]:
    """Ranks on this host whose process no longer exists (ranks on other hosts cannot be checked from here)."""
    here = socket.gethostname()
    return [r for r, (host, pid) in enumerate(_PEERS) if r != rank() and host == here and not process_alive(pid)]


def _is_communication_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        s in text for s in ("gloo", "Connection closed by peer", "Connection reset", "NCCL", "Timed out"))


@contextlib.contextmanager
def naming_lost_ranks(timeout_s: float | None = None) -> Iterator[None]:
    """Turn a failed collective into a :class:`RankLost` that names the rank that died (or the timeout)."""
    try:
        yield
    except RuntimeError as e:
        if not is_distributed() or isinstance(e, RankLost) or not _is_communication_error(e):
            raise
        gone = dead_ranks()
        for _ in range(10):  # a peer's connection can drop just before its process is gone: look again briefly
            if gone:
                break
            time.sleep(0.5)
            gone = dead_ranks()
        if gone:
            named = ", ".join(f"rank {r} (process {_PEERS[r][1]} on {_PEERS[r][0]})" for r in gone)
            what = f"lost {named}: it died or was killed"
        else:
            limit = f" within runtime.dist_timeout_s = {timeout_s:g} s" if timeout_s else ""
            what = f"lost contact with another rank (it died on another host, or did not answer{limit})"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RankLost(f"rank {rank()}: {what}; stopping. Run the same command again: finished stages are "
                       f"skipped. ({first[:160]})") from e


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
