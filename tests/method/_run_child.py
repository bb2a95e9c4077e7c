"""`t3s` in a child process with a real fault injected (the tests of t3s.runlock / write failures / crashes).

    python _run_child.py [--fsize BYTES] [--kill-writing NAME] [--hold-lock DIR] -- t3s arguments...

--fsize: RLIMIT_FSIZE on this process with SIGXFSZ ignored, so a write past it fails with EFBIG.
--kill-writing: SIGKILL this process in the middle of an atomic write whose destination is named NAME: the
    temporary file (or the largest file of a temporary folder) is cut to half its size first, as a write
    interrupted by the kill leaves it.
--hold-lock: take DIR's run lock, print "held", and wait for stdin to close (a live second run).
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from pathlib import Path


def _kill_while_writing(name: str) -> None:
    import t3s.io as io

    real = io.fsync_tree

    def fsync_then_maybe_die(path):
        path = Path(path)
        if path.name.startswith(f".{name}."):
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            victim = max(files, key=lambda f: f.stat().st_size)
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real(path)

    io.fsync_tree = fsync_then_maybe_die


def main(argv: list[str]) -> int:
    split = argv.index("--")
    opts, t3s_args = argv[:split], argv[split + 1:]
    for flag, value in zip(opts[::2], opts[1::2], strict=True):
        if flag == "--fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(value), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        elif flag == "--kill-writing":
            _kill_while_writing(value)
        elif flag == "--hold-lock":
            from t3s.runlock import run_dir_lock

            with run_dir_lock(value):
                print("held", flush=True)
                sys.stdin.read()
            return 0
        else:
            raise SystemExit(f"unknown option {flag}")
    from t3s.cli import main as t3s_main

    return t3s_main(t3s_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
