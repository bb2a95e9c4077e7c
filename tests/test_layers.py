"""The layers written down in pyproject.toml (``[tool.importlinter]``) hold, and the check fails on a planted cycle.

The contracts: ``bench`` -> ``t3s`` -> ``t3s_kernels``; inside ``t3s`` the command, demo and pipeline above the
method, training and generation, above data and I/O; no import cycle among the modules of any package (an import
inside a function counts). ``lint-imports`` from the repository root runs the same check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "t3s", "t3s_kernels")
KEPT = ("top-layers", "t3s-layers", "no-cycles")
# t3s_kernels.linear_ce still has import cycles on this branch (api <-> ops, chunked <-> kernels; issue 21); once
# they are gone, set this to False so the contract is checked like the others.
LINEAR_CE_CYCLES_REMAIN = False


def _lint(root: Path, *contract_ids: str) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root`` with ``root``'s pyproject.toml, in a child process so the
    graph is built from those files, not from modules this process has imported."""
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--no-cache", "--config", str(root / "pyproject.toml")]
    for contract in contract_ids:
        command += ["--contract", contract]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_layers_and_acyclic_contracts_are_kept():
    result = _lint(REPO, *KEPT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" KEPT") == len(KEPT)


@pytest.mark.xfail(LINEAR_CE_CYCLES_REMAIN, strict=True, reason="kernel-side import cycles are fixed on another branch")
def test_linear_ce_has_no_import_cycles():
    result = _lint(REPO, "no-cycles-linear-ce")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_planted_cycle_breaks_the_check(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    io_module = tmp_path / "t3s" / "io.py"
    # a lazy import at the bottom layer of the one module at the top: a cycle (t3s.cli imports t3s.io) and a layer
    # violation, hidden inside a function as the cycles this check exists for were
    io_module.write_text(io_module.read_text() + "\n\ndef _planted():\n    from t3s.cli import main\n\n    return main\n")

    result = _lint(tmp_path, *KEPT)
    assert result.returncode != 0
    out = result.stdout
    assert "no import cycles among the modules of any package of bench or t3s" in out
    assert out.count(" BROKEN") == 2 and out.count(" KEPT") == 1  # the cycle and the t3s layers; bench -> t3s holds
    assert "t3s.io -> t3s.cli" in out
