"""Runs under real faults (issue 22): a second run on the same folder, a killed run's lock, a full disk, a size
limit, a read-only folder, a SIGKILL in the middle of a write, an input edited during the run, a repaired stage.

Faults are injected for real in child processes (``_run_child.py``): ``RLIMIT_FSIZE`` for EFBIG, a tiny tmpfs
for ENOSPC and a read-only remount for EROFS (skipped where ``mount`` is refused), ``SIGKILL`` for crashes.
"Same bytes" compares every hashed output file of every stage with an undisturbed run's, after replacing the
run directory's own path (which a few JSON records name) by a placeholder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import make_tiny, tiny_config

from t3s.config import to_yaml
from t3s.io import TIMINGS_FILE, WriteFailed, stage_done
from t3s.pipeline import Pipeline, run_pipeline
from t3s.runlock import HOLDER_FILE, RunDirBusy, run_dir_lock
from t3s.stages import InputChanged

CHILD = Path(__file__).parent / "_run_child.py"
SMALL = ("variants=[sft]",)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root)
    return root


@pytest.fixture(scope="module")
def clean(root, tmp_path_factory):
    """An undisturbed run and its fingerprint (through the CLI, which also pins the threading environment)."""
    tmp = tmp_path_factory.mktemp("clean")
    run = tmp / "run"
    proc = child("--", "run", str(config_file(root, run, tmp)), "--no-progress")  # as the faulty runs: the CLI
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, fingerprint(run)


def fingerprint(run: Path) -> dict[str, str]:
    """sha256 of every output file a stage marker records, the run directory's path replaced by a placeholder."""
    out = {}
    for marker in sorted((run / ".stages").glob("*.json")):
        if marker.name == "hashes.json":
            continue
        for rel in json.loads(marker.read_text())["outputs"]:
            data = (run / rel).read_bytes().replace(str(run).encode(), b"<RUN>")
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


def config_file(root: Path, run: Path, tmp: Path, *overrides: str) -> Path:
    path = tmp / f"{run.name}.yaml"
    path.write_text(to_yaml(tiny_config(root, run, *SMALL, *overrides)), encoding="utf-8")
    return path


def child(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get(
        "PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def leftovers(run: Path) -> list[str]:
    """Temporary files or folders of interrupted atomic writes, outside stages that will be cleared."""
    return sorted(p.relative_to(run).as_posix() for p in run.rglob(".*.tmp"))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("t3s run: error:")]


# ---- one run at a time ---------------------------------------------------------------------------------------

def test_a_second_run_or_demo_on_a_busy_run_dir_is_refused_naming_the_holder(root, tmp_path, capsys):
    from t3s.cli import main

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, str(CHILD), "--hold-lock", str(run), "--"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = config_file(root, run, tmp_path)
        assert main(["run", str(cfg), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by process {holder.pid} on " in err[0], err
        # in-process, torch is already loaded: portable off, so the refusal is the only line
        assert main(["demo", f"run_dir={run}", "runtime.portable=false", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"process {holder.pid}" in err[0], err
        assert not (run / ".stages").exists()  # nothing written by the refused runs
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (run / HOLDER_FILE).exists()  # released: the next run may start
    logs = []
    with run_dir_lock(run, log=logs.append):
        assert json.loads((run / HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert logs == []  # a lock released properly is not stale


def test_a_killed_runs_lock_is_recognised_as_stale_and_taken_over(tmp_path):
    run = tmp_path / "run"
    code = ("import os, signal, sys; from t3s.runlock import run_dir_lock\n"
            f"with run_dir_lock({str(run)!r}):\n    os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert killed.returncode == -9
    dead = json.loads((run / HOLDER_FILE).read_text())
    logs = []
    with run_dir_lock(run, log=logs.append):
        assert json.loads((run / HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert len(logs) == 1 and f"took over a stale lock on {run}" in logs[0]
    assert f"process {dead['pid']} on {dead['host']}" in logs[0] and "no longer exists" in logs[0], logs


# ---- re-runs reproduce bytes -----------------------------------------------------------------------------------

def _rerun(root, run, *overrides):
    """The re-run through the CLI in a fresh process, as the undisturbed run was: an in-process run would inherit
    whatever thread pools and dispatch state the test session's earlier tests left, and round differently."""
    proc = child("--", "run", str(config_file(root, run, run.parent, *overrides)), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout.splitlines()
    return [line.split()[1] for line in logs if line.endswith(" ...")], "\n".join(logs)


def test_a_repaired_train_stage_reproduces_its_bytes_and_nothing_downstream_reruns(root, clean):
    run = clean[0]  # in place: a copy elsewhere would differ by the run directory's path that summaries record
    timings = (run / "variants" / "sft" / TIMINGS_FILE).read_text()
    assert timings and all("time" not in r for r in map(json.loads, (
        run / "variants" / "sft" / "metrics.jsonl").read_text().splitlines()))  # wall-clock time kept apart
    shutil.rmtree(run / "variants" / "sft")
    ran, log = _rerun(root, run)
    assert ran == ["train_sft"], log  # eval_sft and the report read the same bytes: not re-run
    assert "train_sft: re-running (output variants/sft/" in log
    assert fingerprint(run) == clean[1]
    assert (run / "variants" / "sft" / TIMINGS_FILE).read_text() != ""  # written again, outside the hash


# ---- inputs pinned at validation --------------------------------------------------------------------------------

def test_an_input_edited_during_the_run_is_an_error_naming_it(root, tmp_path, monkeypatch):
    train = tmp_path / "traces.jsonl"
    shutil.copy(make_tiny(root)["train"], train)
    run = tmp_path / "run"
    real = Pipeline.stage_trajectory

    def edit_the_traces_meanwhile(self):
        out = real(self)
        lines = train.read_text().splitlines(keepends=True)
        train.write_text("".join(lines[1:] + lines[:1]))  # same size, other content
        return out

    monkeypatch.setattr(Pipeline, "stage_trajectory", edit_the_traces_meanwhile)
    with pytest.raises(InputChanged, match=f"data.train {train} changed while the run was using it"):
        run_pipeline(tiny_config(root, run, *SMALL, f"data.train={train}"), progress=False, log=lambda s: None)
    assert not stage_done(run, "sft_trajectory")  # its marker would have recorded content it did not read


# ---- write failures -----------------------------------------------------------------------------------------------

def _check_failed_then_repaired(run, cfg, proc, clean, *, cause, fix=lambda: None):
    """One error line naming the stage, a file of the run and the cause; no marker, no temporary left; after
    ``fix`` the same command completes with the undisturbed run's bytes."""
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"cannot write {run}" in lines[0] and cause in lines[0], lines[0]
    stage = lines[0].split("stage ", 1)[1].split(":", 1)[0]
    assert not stage_done(run, stage) and leftovers(run) == [], leftovers(run)
    fix()
    rerun = child("--", "run", str(cfg), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert fingerprint(run) == clean[1]
    return stage


def test_a_file_size_limit_ends_the_stage_with_one_line_and_the_rerun_gives_the_same_bytes(root, clean, tmp_path):
    run = tmp_path / "run"
    cfg = config_file(root, run, tmp_path)
    limit = (clean[0] / "trajectory" / "bottleneck" / "model.safetensors").stat().st_size // 2
    proc = child("--fsize", str(limit), "--", "run", str(cfg), "--no-progress")
    stage = _check_failed_then_repaired(run, cfg, proc, clean, cause="File too large (EFBIG)")
    assert stage == "sft_trajectory"


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"a tiny filesystem needs `mount -t tmpfs` (root with CAP_SYS_ADMIN): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def test_a_full_disk_then_a_read_only_folder_end_the_stage_and_the_reruns_repair(root, clean, tmp_path, tmpfs):
    run = tmpfs / "run"
    cfg = config_file(root, run, tmp_path)
    proc = child("--", "run", str(cfg), "--no-progress")
    _check_failed_then_repaired(run, cfg, proc, clean, cause="No space left on device (ENOSPC)",
                                fix=lambda: _remount(tmpfs, "size=4m"))
    # a read-only run directory: refused before any stage, naming the lock it cannot take
    _remount(tmpfs, "ro")
    proc = child("--", "run", str(cfg), "--no-progress")
    _remount(tmpfs, "rw")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"cannot write {run}/.t3s.lock: Read-only file system (EROFS)" in lines[0], lines[0]
    # a read-only folder inside it (a read-only bind mount over report/): the report stage stops, naming a file
    report = run / "report"
    subprocess.run(["mount", "--bind", str(report), str(report)], check=True)
    try:
        _remount(report, "bind,ro")
        proc = child("--", "run", str(cfg), "--no-progress", "--redo", "report")
    finally:
        subprocess.run(["umount", str(report)], check=True)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"stage report: cannot write {report}: Read-only file system (EROFS)" in lines[0], lines[0]
    rerun = child("--", "run", str(cfg), "--no-progress")
    assert rerun.returncode == 0 and fingerprint(run) == clean[1], rerun.stderr[-3000:]


# ---- a process killed in the middle of a write -------------------------------------------------------------------

@pytest.mark.parametrize(("destination", "stage"), [("final", "sft_trajectory"), ("scores.parquet", "profile_base")])
def test_a_run_killed_while_writing_is_detected_and_the_rerun_gives_the_same_bytes(root, clean, tmp_path,
                                                                                  destination, stage):
    run = tmp_path / "run"
    cfg = config_file(root, run, tmp_path)
    proc = child("--kill-writing", destination, "--", "run", str(cfg), "--no-progress")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert list(run.rglob(f".{destination}.*.tmp")), "the interrupted write is left under its temporary name"
    assert not list(run.rglob(destination)) and not stage_done(run, stage)  # nothing looks complete
    rerun = child("--", "run", str(cfg), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over a stale lock on {run}" in rerun.stdout and "no longer exists" in rerun.stdout
    assert f"[t3s] {stage} ..." in rerun.stdout
    assert fingerprint(run) == clean[1] and leftovers(run) == []
