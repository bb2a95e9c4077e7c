"""Atomic file writes, content hashes and stage markers for run directories.

Every output is written to a temporary file in the destination folder, flushed to disk (``fsync`` of the file,
then of its folder after the rename), and renamed into place, so neither a crash nor a power loss leaves a
half-written file that looks complete. A stage's marker ``<run_dir>/.stages/<name>.json`` is written last,
after its outputs; what it records (dependencies, output sizes and sha256) is decided by ``t3s.stages``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


TIMINGS_FILE = "timings.jsonl"
"""Wall-clock timings of a stage, kept apart from its results (``t3s.stages`` leaves the file out of every hash)."""

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM,
                           errno.EIO})
"""Errors of the filesystem, not of the program: the disk is full, a size limit or quota is hit, it is read-only."""


class RunFault(RuntimeError):
    """A run stopped for a reason outside the program (a full disk, a busy run directory, a dead rank).

    Its message is one line that says what happened and what to do; ``t3s`` prints it as the error.
    """


class WriteFailed(RunFault):
    """A file could not be written for a reason outside the program (its message: the file and the cause)."""

    def __init__(self, path: str | os.PathLike, code: int, *, stage: str | None = None):
        self.path, self.errno, self.stage = Path(path), code, stage
        where = f"stage {stage}: " if stage else ""
        super().__init__(f"{where}cannot write {path}: {os.strerror(code)} ({errno.errorcode.get(code, code)}); "
                         "nothing of it was kept as finished: fix the cause and run the same command again")


def write_errno(exc: BaseException) -> int | None:
    """The filesystem error behind ``exc`` (one of :data:`WRITE_ERRNOS`), or None.

    Writers report it differently: an ``OSError`` (Python, pyarrow), a chained one (``torch.save`` into a Python
    file), or only in the text (safetensors: ``... (os error 28)``).
    """
    seen: BaseException | None = exc
    for _ in range(8):  # the chain of causes is short; a bound guards against cycles
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return seen.errno
        found = re.search(r"(?:os error|errno)\s*(\d+)", str(seen), re.IGNORECASE)
        if found and int(found.group(1)) in WRITE_ERRNOS:
            return int(found.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (folders: so a rename inside them survives a power loss)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders cannot be opened on some platforms: nothing more can be done portably
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. certain network mounts) refuse fsync on folders
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """``fsync`` a file, or every file and folder under a folder (bottom-up)."""
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                _fsync_path(Path(root) / name)
            for name in dirs:
                _fsync_path(Path(root) / name)
    _fsync_path(path)


@contextlib.contextmanager
def naming_write_failures(path: Path) -> Iterator[None]:
    """An ``OSError`` of the filesystem (:data:`WRITE_ERRNOS`) in the body as a :class:`WriteFailed` naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise WriteFailed(path, e.errno) from e
        raise


def _temporary_next_to(path: Path, *, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should get the usual permissions
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it.

    A filesystem error (disk full, file too large, read-only; :data:`WRITE_ERRNOS`) becomes a
    :class:`WriteFailed` that names ``path`` and the cause.
    """
    path = Path(path)
    with naming_write_failures(path):
        tmp = _temporary_next_to(path, is_dir=is_dir)
    try:
        yield tmp
        fsync_tree(tmp)  # the data is on disk before the name points at it
        if is_dir and path.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first, then drop it.
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_path(path.parent)  # the rename itself is durable
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        code = None if isinstance(e, WriteFailed) else write_errno(e)
        if code is not None:
            raise WriteFailed(path, code) from e
        raise


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a truncated or corrupt file is a ``ValueError`` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); the file is corrupt") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); the file is "
                         "truncated or corrupt") from None


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_temporary(name: str) -> bool:
    """Names of this module's temporary files and folders (never part of an output)."""
    return name.startswith(".") and (name.endswith(".tmp") or ".old." in name)


def list_files(path: str | os.PathLike) -> list[Path]:
    """The files of an output: ``path`` itself, or every file under the folder, sorted, temporaries skipped."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
        out += [Path(root) / f for f in sorted(files) if not is_temporary(f)]
    return out


def write_parquet_atomic(path: str | os.PathLike, table: Any) -> Path:
    """Write a ``pyarrow.Table`` atomically."""
    import pyarrow.parquet as pq

    return write_atomic(path, lambda p: pq.write_table(table, p))


def save_torch_atomic(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a Python file, so a failed write keeps its OSError (errno)
            torch.save(obj, f)

    return write_atomic(path, save)


def _marker(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / ".stages" / f"{stage}.json"


def stage_done(run_dir: str | os.PathLike, stage: str) -> bool:
    """Whether ``stage`` finished in ``run_dir`` (its marker exists; ``t3s.stages`` also checks what it records)."""
    return _marker(run_dir, stage).exists()


def stage_info(run_dir: str | os.PathLike, stage: str) -> dict | None:
    """The stage's marker, or None when it is missing or unreadable (an unreadable marker = not finished)."""
    marker = _marker(run_dir, stage)
    if not marker.exists():
        return None
    try:
        info = read_json(marker)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def mark_stage_done(run_dir: str | os.PathLike, stage: str, info: dict | None = None) -> None:
    """Record that ``stage`` finished; call only after all of its outputs are in place."""
    write_json_atomic(_marker(run_dir, stage), {"stage": stage, "finished_at": time.time(), **(info or {})})


def clear_stage(run_dir: str | os.PathLike, stage: str) -> None:
    _marker(run_dir, stage).unlink(missing_ok=True)
