"""Atomic file writes and stage bookkeeping for run directories.

Every output is written to a temporary file in the destination folder and renamed into place, so a crash
never leaves a half-written file that looks complete. A stage is finished when its marker
``<run_dir>/.stages/<name>.json`` exists; markers are written last, after the stage's outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield tmp
        if is_dir and path.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first, then drop it.
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
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
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet_atomic(path: str | os.PathLike, table: Any) -> Path:
    """Write a ``pyarrow.Table`` atomically."""
    import pyarrow.parquet as pq

    return write_atomic(path, lambda p: pq.write_table(table, p))


def save_torch_atomic(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return write_atomic(path, lambda p: torch.save(obj, p))


def _marker(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / ".stages" / f"{stage}.json"


def stage_done(run_dir: str | os.PathLike, stage: str) -> bool:
    """Whether ``stage`` finished in ``run_dir`` (its marker exists)."""
    return _marker(run_dir, stage).exists()


def stage_info(run_dir: str | os.PathLike, stage: str) -> dict | None:
    marker = _marker(run_dir, stage)
    return read_json(marker) if marker.exists() else None


def mark_stage_done(run_dir: str | os.PathLike, stage: str, info: dict | None = None) -> None:
    """Record that ``stage`` finished; call only after all of its outputs are in place."""
    write_json_atomic(_marker(run_dir, stage), {"stage": stage, "finished_at": time.time(), **(info or {})})


def clear_stage(run_dir: str | os.PathLike, stage: str) -> None:
    _marker(run_dir, stage).unlink(missing_ok=True)
