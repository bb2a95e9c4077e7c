"""Resume by dependency and output integrity (t3s.stages), on synthetic stages that count their runs."""

import json
import os

import pytest

from t3s.config import ConfigError
from t3s.io import fsync_tree, read_json, write_text_atomic
from t3s.stages import MARKER_VERSION, Stage, run_stages, select_keys


class Chain:
    """source (reads an external file) -> double (reads source's output) -> report (reads everything)."""

    def __init__(self, root, ext):
        self.root, self.ext, self.runs = root, ext, []

    def source(self):
        self.runs.append("source")
        write_text_atomic(self.root / "a" / "value.txt", self.ext.read_text())

    def double(self):
        self.runs.append("double")
        write_text_atomic(self.root / "b.txt", (self.root / "a" / "value.txt").read_text() * 2)

    def bare(self):
        self.runs.append("bare")

    def stages(self):
        return [
            Stage("source", self.source, config=("x", "-x.ignored"), inputs={"ext": self.ext}, outputs=("a",)),
            Stage("double", self.double, config=("y",), inputs={"a": self.root / "a"}, outputs=("b.txt",)),
            ("bare", self.bare),  # undeclared: depends on everything before it
        ]

    def run(self, cfg, **kw):
        self.runs, logs = [], []
        run_stages(self.root, cfg, self.stages(), log=logs.append, **kw)
        return self.runs, "\n".join(logs)


CFG = {"x": {"a": 1, "ignored": 0}, "y": 2, "run_dir": "/somewhere", "runtime": {"threads": 2},
       "model": {"path": "/m"}}


@pytest.fixture
def chain(tmp_path):
    ext = tmp_path / "input.txt"
    ext.write_text("3")
    c = Chain(tmp_path / "run", ext)
    assert c.run(CFG)[0] == ["source", "double", "bare"]
    return c


def test_unchanged_run_reuses_every_declared_stage(chain):
    runs, log = chain.run(CFG)
    assert runs == []
    assert "source: done earlier, skipped" in log and "bare: done earlier, skipped" in log
    marker = read_json(chain.root / ".stages" / "double.json")
    assert marker["version"] == MARKER_VERSION and marker["config"] == {"y": 2}
    assert marker["outputs"]["b.txt"]["size"] == 2 and len(marker["outputs"]["b.txt"]["sha256"]) == 64


def test_a_changed_key_reruns_that_stage_and_what_reads_its_changed_outputs(chain):
    runs, log = chain.run({**CFG, "y": 5})
    assert runs == ["double", "bare"]  # bare depends on double's outputs, which were rewritten
    assert "double: re-running (config changed: y 2 -> 5)" in log
    # Path keys (run_dir, model.path: compared by content as inputs) and runtime keys never invalidate a stage.
    moved = {**CFG, "y": 5, "run_dir": "/elsewhere/../x/", "runtime": {"threads": 1}, "model": {"path": "/other"}}
    assert chain.run(moved)[0] == []
    # A key ``source`` excludes re-runs only the undeclared stage, which depends on every key.
    assert chain.run({**moved, "x": {"a": 1, "ignored": 9}})[0] == ["bare"]


def test_an_input_change_propagates_only_while_outputs_differ(chain):
    chain.ext.write_text("4")
    runs, log = chain.run(CFG)
    assert runs == ["source", "double", "bare"] and "source: re-running (input changed: ext)" in log
    assert "double: re-running (input changed: a)" in log
    chain.ext.write_text("4")  # same bytes, new mtime: re-hashed, found equal
    os.utime(chain.ext, ns=(1, 1))
    assert chain.run(CFG)[0] == []


@pytest.mark.parametrize("fault", ["truncate", "delete", "same_size_edit"])
def test_damaged_outputs_are_named_and_the_stage_re_runs(chain, fault):
    out = chain.root / "a" / "value.txt"
    if fault == "truncate":
        out.write_text("")
        why = "output a/value.txt has 0 bytes, 1 were written"
    elif fault == "delete":
        out.unlink()
        why = "output a/value.txt is missing"
    else:
        out.write_text("9")
        why = "output a/value.txt changed since it was written"
    runs, log = chain.run(CFG)
    assert f"source: re-running ({why}" in log
    assert runs == ["source"]  # re-written with the same bytes: nothing downstream re-runs
    assert out.read_text() == "3"


def test_full_verification_catches_an_edit_that_keeps_size_and_mtime(chain):
    out = chain.root / "b.txt"
    st = out.stat()
    out.write_text("99")
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert chain.run(CFG)[0] == []  # runtime.verify=stat trusts size + mtime
    runs, log = chain.run(CFG, trust_stat=False)
    assert runs == ["double"] and "b.txt changed since it was written" in log
    assert out.read_text() == "33"  # repaired; bare read the same bytes before, so it is kept


def test_redo_and_old_or_corrupt_markers(chain):
    assert chain.run(CFG, redo=["dou*"])[0] == ["double"]  # same bytes again: bare is kept
    with pytest.raises(ConfigError, match="no such stage.*source, double, bare"):
        chain.run(CFG, redo=["nope"])
    marker = chain.root / ".stages" / "source.json"
    marker.write_text(json.dumps({"stage": "source"}))  # a marker from before dependency records
    runs, log = chain.run(CFG)
    assert runs == ["source"] and "older t3s" in log
    marker.write_text('{"stage": "sou')  # truncated marker = not finished
    assert chain.run(CFG)[0] == ["source"]


def test_a_stage_that_does_not_write_its_declared_output_fails(tmp_path):
    with pytest.raises(RuntimeError, match="without writing missing.txt"):
        run_stages(tmp_path, {}, [Stage("s", lambda: None, outputs=("missing.txt",))], log=lambda s: None)


def test_select_keys_prefixes_and_exclusions():
    flat = {"optim.lr": 1, "optim.eps": 2, "optimizer": 3, "data.train": "p", "data.max_length": 4,
            "runtime.threads": 2}
    assert select_keys(flat, ["optim", "data", "-optim.eps", "runtime"]) == {"data.max_length": 4, "optim.lr": 1}
    assert select_keys(flat, [""]) == {"data.max_length": 4, "optim.eps": 2, "optim.lr": 1, "optimizer": 3}


def test_fsync_tree_walks_files_and_folders(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_text("x")
    fsync_tree(tmp_path / "d")  # no error on folders; the data is on disk
    fsync_tree(tmp_path / "d" / "e" / "f")
