"""One run at a time per run directory: an exclusive lock with a record of who holds it.

The lock is ``filelock.FileLock`` on ``<run_dir>/.t3s.lock`` (``flock`` on POSIX, ``LockFileEx`` on Windows): the
operating system releases it when the holding process ends, however it ends, so a killed run never blocks the
next one. The holder's process id, host and start time go to ``<run_dir>/.t3s.lock.json`` (written atomically
once the lock is held, removed on release): a second run is refused with one line naming the holder, and a run
that finds a record but wins the lock knows the record's process died without releasing it (a stale lock) and
says so in the log before taking over.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from t3s.io import RunFault, naming_write_failures, read_json, write_json_atomic

LOCK_FILE = ".t3s.lock"
HOLDER_FILE = ".t3s.lock.json"


class RunDirBusy(RunFault):
    """Another live process holds the run directory's lock."""


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def describe_holder(record: dict | None) -> str:
    if not record:
        return "a process that has not recorded itself yet"
    return f"process {record.get('pid')} on {record.get('host')} (started {record.get('started')})"


def _read_holder(path: Path) -> dict | None:
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None  # missing, or cut short by a crash while it was written: nothing to name
    return record if isinstance(record, dict) else None


def stale_reason(record: dict) -> str:
    """Why a recorded holder that no longer holds the lock is gone (the OS released its lock)."""
    from t3s.distributed import process_alive

    same_host = record.get("host") == socket.gethostname()
    if same_host and isinstance(record.get("pid"), int) and not process_alive(record["pid"]):
        return "that process no longer exists"
    return "that process ended without releasing it"


_HELD: dict[str, int] = {}
"""Run directories this process holds, with the nesting depth (``t3s demo`` holds it around the pipeline's own)."""


@contextmanager
def _exclusive(run_dir: Path, log: Callable[[str], None]) -> Iterator[None]:
    from filelock import FileLock, Timeout

    with naming_write_failures(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    holder_path = run_dir / HOLDER_FILE
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        with naming_write_failures(run_dir / LOCK_FILE):  # e.g. a read-only run directory, before any stage
            lock.acquire()
    except Timeout:
        raise RunDirBusy(f"run directory {run_dir} is in use by {describe_holder(_read_holder(holder_path))}; "
                         "wait for it to finish (or stop it) and run again") from None
    try:
        previous = _read_holder(holder_path)
        if previous is not None:
            log(f"[t3s] took over a stale lock on {run_dir}: it was held by {describe_holder(previous)}, and "
                f"{stale_reason(previous)}")
        write_json_atomic(holder_path, _holder_record())
        yield
    finally:
        holder_path.unlink(missing_ok=True)
        lock.release()


@contextmanager
def run_dir_lock(run_dir: str | os.PathLike, *, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body; raise :class:`RunDirBusy` naming the holder when it is taken.

    Under ``torchrun`` rank 0 holds it, and a refusal is raised on every rank. Re-entrant within a process.
    """
    from t3s import distributed as D

    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if not D.is_main():
        refused = D.broadcast_object(None)
        if refused:
            raise RunDirBusy(refused)
        yield
        return
    if key in _HELD:
        D.broadcast_object(None)
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    with ExitStack() as stack:
        try:
            stack.enter_context(_exclusive(run_dir, log))
        except RunDirBusy as e:
            D.broadcast_object(str(e))
            raise
        D.broadcast_object(None)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
