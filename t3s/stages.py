"""Resumable stages over a run directory: reuse a finished stage only while what it depended on is unchanged.

A :class:`Stage` declares what it reads and writes:

- ``config``: dotted config keys (or section prefixes such as ``"optim"``) whose values decide its result;
  ``"-data.heldout"`` excludes a key a prefix would include. Path-valued keys and ``run_dir`` are never
  compared by spelling (see ``inputs``), so a trailing ``/``, a ``..`` or a moved folder still resumes.
- ``inputs``: ``{label: path}`` of files / folders it reads, compared by content (sha256). Inputs inside the
  run directory are other stages' outputs: when an upstream stage re-runs and writes different files, every
  stage that reads them re-runs; when it writes the same bytes, they are kept.
- ``outputs``: run-directory paths it writes. After the stage, its marker ``.stages/<name>.json`` records the
  size and sha256 of every file in them; a re-run checks them and re-runs a stage whose outputs changed or
  vanished, naming the file.

Inputs outside the run directory (model, tokenizer, traces, held-out set) are pinned when the run starts
(:func:`pin_inputs`, before validation reads them): a stage that finds one changed since then fails with
:class:`InputChanged` naming the file, before it runs and again before its marker is written, so no marker
records content that the stage did not read.

Files named in :data:`UNHASHED_FILES` (wall-clock timings) are written with the outputs but never hashed: a
repaired stage reproduces its recorded bytes, and nothing downstream re-runs for a different duration.

A file whose size and modification time match the last hash taken of it is not read again
(``runtime.verify=stat``, the default; ``sha256`` re-reads every output and input on every run).
A stage declared as a bare ``(name, fn)`` pair depends on the whole config and on every earlier stage's
outputs, and declares no outputs: always correct, only less selective.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t3s import distributed as D
from t3s.io import (TIMINGS_FILE, WRITE_ERRNOS, WriteFailed, file_sha256, list_files, naming_write_failures,
                   read_json, stage_info, write_json_atomic)

MARKER_VERSION = 2

PATH_KEYS = ("run_dir", "model.path", "model.tokenizer", "data.train", "data.heldout", "accuracy.curve")
"""Config keys that name files: compared by the content of what they name (as stage inputs), never by spelling."""

UNHASHED_FILES = frozenset({TIMINGS_FILE})
"""Output files that record how long things took: kept with the outputs, left out of every hash."""

UNCOMPARED_PREFIXES = ("runtime.",)
"""Keys that change how a run executes, not what it computes (threads, verification): recorded, not compared."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[], dict | None]
    config: tuple[str, ...] = ("",)
    """Config key prefixes the stage's result depends on ("" = every key); ``-key`` excludes a key."""
    inputs: Mapping[str, str | os.PathLike | None] = field(default_factory=dict)
    """``{label: path}`` read by the stage; None / "" entries are skipped (an unset optional input)."""
    outputs: tuple[str, ...] = ()
    """Paths relative to the run directory that the stage writes (files or folders)."""


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, prefix: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + ".")


def select_keys(flat: Mapping[str, Any], patterns: Iterable[str]) -> dict[str, Any]:
    """The entries of ``flat`` a stage depends on (path keys and runtime keys excluded)."""
    patterns = list(patterns)
    include = [p for p in patterns if not p.startswith("-")]
    exclude = [p[1:] for p in patterns if p.startswith("-")]
    return {k: v for k, v in sorted(flat.items())
            if any(_matches(k, p) for p in include) and not any(_matches(k, p) for p in exclude)
            and k not in PATH_KEYS and not k.startswith(UNCOMPARED_PREFIXES)}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class HashCache:
    """sha256 of files, remembered by (resolved path, size, mtime) in ``<run_dir>/.stages/hashes.json``."""

    def __init__(self, path: Path, *, trust_stat: bool = True):
        self.path, self.trust_stat = path, trust_stat
        self.entries: dict[str, list] = {}
        self.dirty = False
        if path.exists():
            try:
                loaded = read_json(path)
                self.entries = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                self.entries = {}  # a damaged cache only costs re-hashing

    def file(self, path: Path) -> dict:
        st = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if self.trust_stat and hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return {"size": st.st_size, "sha256": hit[2]}
        digest = file_sha256(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return {"size": st.st_size, "sha256": digest}

    def tree(self, path: Path) -> dict[str, dict]:
        """``{relative file: {size, sha256}}`` of a file or folder ({} when it does not exist)."""
        path = Path(path)
        if path.is_file():
            return {path.name: self.file(path)}
        return {f.relative_to(path).as_posix(): self.file(f) for f in hashed_files(path)}

    def digest(self, path: Path) -> str | None:
        files = self.tree(path)
        if not files:
            return None
        return hashlib.sha256(_canonical(files).encode()).hexdigest()

    def save(self) -> None:
        if self.dirty:
            write_json_atomic(self.path, self.entries)
            self.dirty = False


def hashed_files(path: Path) -> list[Path]:
    """The files of an output that its record covers (timings left out)."""
    return [f for f in list_files(path) if f.name not in UNHASHED_FILES]


class InputChanged(ValueError):
    """An input outside the run directory changed after the run pinned (validated) it."""


@dataclass
class Pins:
    """Content digests of a run's external inputs, taken when it starts (:func:`pin_inputs`)."""

    hashes: HashCache
    digests: dict[str, tuple[str, str | None]]
    """``{resolved path: (label, digest)}``"""

    def check(self, path: Path, digest: str | None) -> None:
        pinned = self.digests.get(str(path.resolve()))
        if pinned is not None and pinned[1] != digest:
            raise InputChanged(f"{pinned[0]} {path} changed while the run was using it (its content differs from "
                               "when the run started and validated it); a stage must not mix two versions of an "
                               "input: leave it unchanged until the run ends, then run again")


def pin_inputs(run_dir: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], *,
               trust_stat: bool = True) -> Pins:
    """Digest every ``{label: path}`` now (unset entries skipped), for :func:`run_stages` to re-check."""
    hashes = HashCache(Path(run_dir) / ".stages" / "hashes.json", trust_stat=trust_stat)
    digests = {str(Path(p).resolve()): (label, hashes.digest(Path(p))) for label, p in inputs.items() if p}
    return Pins(hashes, digests)


@dataclass
class Decision:
    run: bool
    reason: str = ""


class StageBook:
    """Decides, for one run directory and config, which stages can be reused; writes their markers."""

    def __init__(self, run_dir: str | os.PathLike, config: Mapping, *, trust_stat: bool = True,
                 pins: Pins | None = None):
        self.run_dir = Path(run_dir)
        self.flat = flatten(config)
        self.pins = pins
        self.hashes = pins.hashes if pins else HashCache(self.run_dir / ".stages" / "hashes.json",
                                                         trust_stat=trust_stat)

    def _inputs(self, stage: Stage) -> dict[str, str | None]:
        out = {}
        for label, p in sorted(stage.inputs.items()):
            if p:
                out[label] = self.hashes.digest(Path(p))
                if self.pins:
                    self.pins.check(Path(p), out[label])
        return out

    def record(self, stage: Stage) -> dict:
        """What the stage depends on now (config values and input content digests)."""
        return {"config": select_keys(self.flat, stage.config), "inputs": self._inputs(stage)}

    def decide(self, stage: Stage, *, redo: bool = False) -> Decision:
        info = stage_info(self.run_dir, stage.name)
        if info is None:
            return Decision(True, "")
        if redo:
            return Decision(True, "asked for with --redo")
        if info.get("version") != MARKER_VERSION:
            return Decision(True, "finished by an older t3s that kept no dependency record")
        now = self.record(stage)
        old_cfg, new_cfg = info.get("config", {}), now["config"]
        changed = [k for k in sorted(set(old_cfg) | set(new_cfg))
                   if _canonical(old_cfg.get(k)) != _canonical(new_cfg.get(k))]
        if changed:
            shown = ", ".join(f"{k} {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            return Decision(True, f"config changed: {shown}{more}")
        old_in, new_in = info.get("inputs", {}), now["inputs"]
        changed = [k for k in sorted(set(old_in) | set(new_in)) if old_in.get(k) != new_in.get(k)]
        if changed:
            return Decision(True, f"input changed: {', '.join(changed)}")
        problem = self.verify_outputs(info.get("outputs", {}))
        if problem:
            return Decision(True, problem)
        return Decision(False)

    def verify_outputs(self, recorded: Mapping[str, Mapping]) -> str | None:
        """The first recorded output file that is missing or differs, as a sentence; None when all match."""
        for rel, want in sorted(recorded.items()):
            path = self.run_dir / rel
            if not path.is_file():
                return f"output {rel} is missing"
            size = path.stat().st_size
            if size != want.get("size"):
                return f"output {rel} has {size} bytes, {want.get('size')} were written (truncated or replaced)"
            if self.hashes.file(path)["sha256"] != want.get("sha256"):
                return f"output {rel} changed since it was written (sha256 differs)"
        return None

    def clear(self, stage: Stage) -> None:
        """Remove the marker and the declared outputs before a stage re-runs (no stale files mix in)."""
        (self.run_dir / ".stages" / f"{stage.name}.json").unlink(missing_ok=True)
        for rel in stage.outputs:
            path = self.run_dir / rel
            with naming_write_failures(path):  # rmtree's own errors name a file relative to a folder it is in
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()

    def finish(self, stage: Stage, info: Mapping | None = None) -> dict:
        """Write the marker: dependencies, and size + sha256 of every output file. Call after the outputs exist."""
        outputs: dict[str, dict] = {}
        for rel in stage.outputs:
            path = self.run_dir / rel
            if not path.exists():
                raise RuntimeError(f"stage {stage.name} finished without writing {rel}")
            for f in ([path] if path.is_file() else hashed_files(path)):
                outputs[f.relative_to(self.run_dir).as_posix()] = self.hashes.file(f)
        marker = {"stage": stage.name, "version": MARKER_VERSION, **self.record(stage), "outputs": outputs,
                  **dict(info or {})}
        write_json_atomic(self.run_dir / ".stages" / f"{stage.name}.json", marker)
        self.hashes.save()
        return marker


def as_stage(entry: Stage | tuple, earlier: list[Stage], run_dir: Path) -> Stage:
    """A bare ``(name, fn)`` pair as a :class:`Stage` that depends on everything before it."""
    if isinstance(entry, Stage):
        return entry
    name, fn = entry
    upstream = {s.name + ":" + rel: run_dir / rel for s in earlier for rel in s.outputs}
    return Stage(name, fn, config=("",), inputs=upstream)


def resolve_redo(names: Iterable[str], stages: Iterable[Stage]) -> set[str]:
    """Stage names (or shell patterns such as ``train_*``) for ``--redo``; an unknown name is an error."""
    import fnmatch

    from t3s.config import ConfigError

    known = [st.name for st in stages]
    out: set[str] = set()
    for name in names:
        hit = [k for k in known if fnmatch.fnmatchcase(k, name)]
        if not hit:
            raise ConfigError(f"--redo {name}: no such stage in this run; stages: {', '.join(known)}")
        out.update(hit)
    return out


@contextlib.contextmanager
def _naming_the_stage(name: str, run_dir: Path) -> Iterator[None]:
    """A filesystem error inside a stage as one :class:`WriteFailed` line with the stage, file and cause."""
    try:
        yield
    except WriteFailed as e:
        raise WriteFailed(e.path, e.errno, stage=name) from e
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise WriteFailed(e.filename or run_dir, e.errno, stage=name) from e


def run_stages(run_dir: str | os.PathLike, config: Mapping, entries: Iterable[Stage | tuple], *,
               redo: Iterable[str] = (), trust_stat: bool = True, log: Callable[[str], None] = print,
               record: Mapping | None = None, pins: Pins | None = None) -> list[str]:
    """Run every stage that is not reusable, in order; returns the names of the stages that ran.

    ``record`` goes into each marker as is (the pipeline stores the threads and determinism in effect).
    ``pins``: external inputs digested at the start (:func:`pin_inputs`); a change is :class:`InputChanged`.
    A filesystem error while a stage writes (disk full, file too large, read-only) is a :class:`WriteFailed`
    naming the stage, the file and the cause; the stage gets no marker, so the next run re-runs it.

    Rank 0 decides and writes markers; every rank runs each stage (the stage itself decides who writes).
    """
    import time

    run_dir = Path(run_dir)
    stages: list[Stage] = []
    for entry in entries:
        stages.append(as_stage(entry, stages, run_dir))
    redo_set = resolve_redo(redo, stages)
    book = StageBook(run_dir, config, trust_stat=trust_stat, pins=pins) if D.is_main() else None
    ran = []
    for stage in stages:
        decision = D.broadcast_object(book.decide(stage, redo=stage.name in redo_set) if book else None)
        if not decision.run:
            log(f"[t3s] {stage.name}: done earlier, skipped (config, inputs and outputs unchanged)")
            continue
        if decision.reason:
            log(f"[t3s] {stage.name}: re-running ({decision.reason})")
        with _naming_the_stage(stage.name, run_dir):
            if book:
                book.clear(stage)
            D.barrier()
            log(f"[t3s] {stage.name} ...")
            t0 = time.time()
            info = stage.run() or {}
            D.barrier()
            if book:
                book.finish(stage, {"finished_at": time.time(), "seconds": round(time.time() - t0, 2),
                                    "info": info, **dict(record or {})})
        D.barrier()
        ran.append(stage.name)
    return ran
