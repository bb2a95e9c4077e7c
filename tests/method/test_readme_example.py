"""The README's end-to-end Python example runs as written (on the tiny offline model and data)."""

import re
from pathlib import Path

from _tiny import make_tiny

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    (code,) = [b for b in blocks if "profile_confidence(" in b]
    paths = make_tiny(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    for name in ("theta0", "theta_b"):  # θb = θ0 is enough to run every call
        (tmp_path / "ckpt" / name).symlink_to(paths["model"])
    (tmp_path / "traces.jsonl").symlink_to(paths["train"])
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    examples, selection = scope["examples"], scope["selection"]
    assert len(examples) == len(selection.ids) > 0
    assert all(len(e.token_weight) == len(e.labels) for e in examples)
    assert (tmp_path / "run" / "selections" / "t3s" / "selection.json").exists()
