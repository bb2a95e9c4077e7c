"""``python -m bench <name> [args]`` runs ``bench/<name>.py``'s ``main(argv)``; ``python -m bench --list`` lists them.

Every benchmark appends machine-stamped rows to ``bench/results/<name>.csv`` (see :mod:`bench.common`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

_NOT_BENCHMARKS = {"common", "__main__", "__init__", "conftest"}


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    # test_*.py are pytest-benchmark micro-benchmarks (bench/test_micro.py), run through pytest; _*.py are helpers
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if m.name not in _NOT_BENCHMARKS and not m.name.startswith(("test_", "_")))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bench <name> [args]   |   python -m bench --list\n\nbenchmarks: " + ", ".join(names))
        return 0 if argv else 2
    if argv[0] == "--list":
        for name in names:
            try:
                doc = (importlib.import_module(f"bench.{name}").__doc__ or "").strip().splitlines()
                line = doc[0] if doc else ""
            except Exception as exc:  # noqa: BLE001 - list the others even if one module is broken
                line = f"(import failed: {type(exc).__name__}: {exc})"
            print(f"{name:20s} {line}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"bench.{name}").main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
