"""The whole pipeline end to end on a tiny random model, a resume after a simulated crash, and the CLI."""

import json

import pytest
import torch
from _tiny import make_tiny, tiny_config

from t3s.cli import main
from t3s.io import stage_done
from t3s.pipeline import Pipeline, run_pipeline

VARIANTS = "variants=[sft,t3s,neg_t3s,static_low_conf,rrt]"


class Crash(RuntimeError):
    pass


def _weights(run, variant):
    from safetensors.torch import load_file

    return load_file(str(run / "variants" / variant / "final" / "model.safetensors"))


def _results(run):
    return {k: v["heldout_accuracy"] for k, v in ((r["model"], r) for r in
                                                  json.loads((run / "report" / "results.json").read_text())["rows"])}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root)
    return root


CLEAN = (VARIANTS, "diagnostics.loss_transfer=true", "diagnostics.loss_transfer_steps=2",
         "diagnostics.anchor_intervention=true")  # the overrides clean_run was made with


@pytest.fixture(scope="module")
def clean_run(root, tmp_path_factory):
    run = tmp_path_factory.mktemp("clean")
    cfg = tiny_config(root, run, *CLEAN)
    report = run_pipeline(cfg, progress=False, log=lambda s: None)
    return run, report


def test_end_to_end_writes_every_stage_and_the_report(clean_run):
    run, report = clean_run
    p = Pipeline(tiny_config(run.parent, run, VARIANTS, "diagnostics.loss_transfer=true"))
    assert all(stage_done(run, st.name) for st in p.stages())
    assert report.exists() and "Results (held-out, greedy)" in report.read_text()
    for png in ("training_dynamics", "delta_c", "group_dprob", "grad_stats"):
        assert (run / "report" / f"{png}.png").stat().st_size > 1000
    res = json.loads((run / "report" / "results.json").read_text())
    assert [r["model"] for r in res["rows"]] == ["base", "sft", "t3s", "neg_t3s", "static_low_conf", "rrt"]
    assert res["bottleneck"]["method"] == "argmin" and res["bottleneck"]["step"] >= 1
    assert set(res["loss_transfer"]["matrix_percent"]) == {"anchor_easy", "anchor_hard", "other_easy", "other_hard"}
    # T3S masks exactly the anchors, −T3S exactly the rest, the static baseline the same fraction as T3S.
    sel = res["selections"]
    # End tokens stay trained under every AR rule (select.always_train_eos, the default).
    assert sel["t3s"]["end_tokens"] > 0 and sel["t3s"]["end_selected"] == sel["neg_t3s"]["end_selected"] == 0
    assert (sel["t3s"]["num_selected"] + sel["neg_t3s"]["num_selected"]
            == sel["t3s"]["num_tokens"] - sel["t3s"]["end_tokens"])
    assert sel["static_low_conf"]["num_selected"] == sel["t3s"]["num_selected"]
    # every fraction-matched baseline masks exactly as many tokens as T3S, after the end-token exemption
    from t3s.select import select_tokens

    for rule in ("static_high_conf", "static_low_conf", "random"):
        for ranking in ("global", "per_sequence"):
            other = select_tokens(run / "delta", rule=rule, always_train_eos=True, ranking=ranking)
            assert other.stats["num_selected"] == sel["t3s"]["num_selected"] and other.stats["end_selected"] == 0
    sft_rows = [json.loads(x) for x in (run / "variants" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("grad_cosine" in r and "dprob_anchor" in r for r in sft_rows)
    assert all("paper" not in r or r["paper"] is None for r in res["rows"])  # no paper numbers: setting differs
    # Fig. 5 intervention: recorded per checkpoint, and the weights it perturbs are restored exactly — the SFT
    # variant (with the intervention) ends bit-identical to the trajectory run (same data, no intervention).
    assert all(k in r for r in sft_rows if "grad_cosine" in r for k in (
        "loss_anchor", "intervention_anchor_step_dloss_other", "intervention_other_step_dloss_anchor"))
    assert (run / "report" / "intervention.png").stat().st_size > 1000
    from safetensors.torch import load_file

    traj = load_file(str(run / "trajectory" / "final" / "model.safetensors"))
    sft = _weights(run, "sft")
    assert all(torch.equal(traj[k], sft[k]) for k in sft)
    # RRT takes θf from the trajectory run itself (argmin runs it to the end).
    rrt_marker = json.loads((run / ".stages" / "rrt.json").read_text())
    assert rrt_marker["info"]["theta_f"] == str(run / "trajectory" / "final")
    text = report.read_text()
    assert "argmin of training accuracy over steps >= 1 (bottleneck.min_step: a departure from" in text
    assert "no Imitation Shock" in text and "only because bottleneck.min_step=1 leaves θ0 out" in text
    assert "confirmed at" not in text and "max_new_tokens 6" in text
    assert f"θf = `{run / 'trajectory' / 'final'}`" in text
    assert "θb is unreliable" in text  # tiny_config takes θb from a flat / truncated curve with on_bad_curve=warn


def test_resume_after_a_crash_skips_finished_stages_and_gives_identical_results(root, clean_run, tmp_path,
                                                                                 monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_config(root, run, VARIANTS, "diagnostics.loss_transfer=true", "diagnostics.loss_transfer_steps=2")
    real_train = Pipeline.stage_train

    def crashing(self, variant):
        if variant == "t3s":
            raise Crash("killed while training t3s")
        return real_train(self, variant)

    monkeypatch.setattr(Pipeline, "stage_train", crashing)
    with pytest.raises(Crash):
        run_pipeline(cfg, progress=False, log=lambda s: None)
    assert stage_done(run, "train_sft") and not stage_done(run, "train_t3s")
    monkeypatch.undo()

    ran = []
    for name in ("stage_trajectory", "stage_profile", "stage_train", "stage_eval"):
        real = getattr(Pipeline, name)
        monkeypatch.setattr(Pipeline, name, lambda self, *a, _r=real, _n=name: (ran.append((_n, *a)), _r(self, *a))[1])
    run_pipeline(cfg, progress=False, log=lambda s: None)
    assert ("stage_trajectory",) not in ran and ("stage_train", "sft") not in ran
    assert ("stage_train", "t3s") in ran and ("stage_eval", "base") in ran

    clean, _ = clean_run
    assert _results(run) == _results(clean)
    for v in ("sft", "t3s", "rrt"):
        a, b = _weights(run, v), _weights(clean, v)
        assert all(torch.equal(a[k], b[k]) for k in a), v


def test_cli_run_resumes_and_rebuilds_the_report(clean_run, capsys):
    run, _ = clean_run
    assert main(["run", str(run / "config.yaml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "done earlier, skipped" in out and "| T3S |" in out and "report:" in out
    (run / "report" / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "report.md").exists()


def test_cli_train_with_a_selection(clean_run, tmp_path, capsys):
    run, _ = clean_run
    rc = main(["train", str(run / "config.yaml"), "train.steps=1", "--selection", str(run / "selections" / "t3s"),
               "--out", str(tmp_path / "one"), "--no-progress"])
    assert rc == 0 and (tmp_path / "one" / "final" / "config.json").exists()


def test_cli_train_dllm_with_targets(clean_run, tmp_path):
    run, _ = clean_run
    assert main(["select", "--delta", str(run / "delta"), "--rule", "dllm_targets", "--out", str(tmp_path / "B")]) == 0
    rc = main(["train", str(run / "config.yaml"), "train.steps=1", "dllm.mask_token_id=3", "dllm.block_size=4",
               "--mode", "dllm", "--selection", str(tmp_path / "B"), "--out", str(tmp_path / "d"), "--no-progress"])
    assert rc == 0 and (tmp_path / "d" / "final" / "config.json").exists()
    assert (tmp_path / "d" / "metrics.jsonl").read_text().strip()


def test_clear_errors_for_bad_data(root, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = tiny_config(root, tmp_path / "run", f"data.train={empty}")
    with pytest.raises(ValueError, match="empty"):
        run_pipeline(cfg, progress=False, log=lambda s: None)
    nohead = tmp_path / "noanswer.jsonl"
    nohead.write_text(json.dumps({"id": "a", "prompt": "1+1", "response": "2"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        run_pipeline(tiny_config(root, tmp_path / "run2", f"data.train={nohead}"), progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="model.selector"):
        run_pipeline(tiny_config(root, tmp_path / "run3", "train.mode=dllm"), progress=False, log=lambda s: None)


def test_cli_overrides_may_follow_flags_and_bad_flags_are_errors(clean_run, capsys):
    run, _ = clean_run
    assert main(["run", str(run / "config.yaml"), "--no-progress", "optim.lr=-1"]) == 2  # parsed as override
    assert "optim.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(run / "config.yaml"), "--bogus"])


# ---- resume by dependency, integrity, validation before work (issue 15) ----------------------------------------

def _copy(run, dest):
    import shutil

    shutil.copytree(run, dest)
    return dest


def _rerun(root, run_dir, *overrides, redo=()):
    logs = []
    run_pipeline(tiny_config(root, run_dir, *CLEAN, *overrides), progress=False, log=logs.append, redo=redo)
    ran = [line.split()[1].rstrip(":") for line in logs if line.endswith(" ...")]
    return ran, "\n".join(logs)


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_moved_or_differently_spelled_run_dir_resumes_everything(root, clean_run, tmp_path):
    moved = _copy(clean_run[0], tmp_path / "moved")
    (tmp_path / "sub").mkdir()
    _rerun(root, moved)  # another test rebuilt this report with `t3s report`, which keeps no stage record
    for spelling in (f"{moved}/", f"{tmp_path}/sub/../moved"):
        ran, log = _rerun(root, spelling)
        assert ran == [], log
        assert "re-running" not in log


def test_a_changed_key_reruns_only_the_stages_that_read_it(root, clean_run, tmp_path):
    run = _copy(clean_run[0], tmp_path / "run")
    ran, log = _rerun(root, run, "eval.max_new_tokens=5")
    evals = [f"eval_{m}" for m in ("base", "sft", "t3s", "neg_t3s", "static_low_conf", "rrt")]
    assert ran == [*evals, "report"], log
    assert "eval_base: re-running (config changed: eval.max_new_tokens 6 -> 5)" in log
    ran, log = _rerun(root, run, "eval.max_new_tokens=5", redo=["eval_base"])
    assert ran == ["eval_base"] and "asked for with --redo" in log  # same accuracy file: report kept


def test_damaged_outputs_of_every_kind_are_named_and_repaired(root, clean_run, tmp_path):
    clean = clean_run[0]
    run = _copy(clean, tmp_path / "run")
    delta_parquet = sorted((run / "delta").glob("*.parquet"))[0]
    faults = {  # file -> the stage that wrote it
        run / "trajectory" / "bottleneck" / "model.safetensors": "sft_trajectory",  # θb checkpoint
        run / "variants" / "sft" / "final" / "model.safetensors": "train_sft",  # final checkpoint
        run / "variants" / "t3s" / "metrics.jsonl": "train_t3s",  # metrics
        delta_parquet: "delta",  # Parquet
        run / "eval" / "base.json": "eval_base",  # eval JSON
    }
    for i, path in enumerate(faults):
        if i % 2:
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ran, log = _rerun(root, run)
    assert set(faults.values()) <= set(ran)
    assert "profile_base" not in ran  # untouched and not downstream of a change
    # A stage whose inputs are unchanged names its damaged file; one downstream of a re-run stage may re-run
    # for that reason first (profile / Δc provenance files record timings, so a re-run rewrites them).
    for path, stage in faults.items():
        rel = path.relative_to(run).as_posix()
        assert f"{stage}: re-running (output {rel} " in log or f"{stage}: re-running (input changed" in log, rel
    for stage in ("sft_trajectory", "delta", "eval_base"):
        rel = next(p.relative_to(run).as_posix() for p, s in faults.items() if s == stage)
        assert f"{stage}: re-running (output {rel} " in log, (rel, log)
    from safetensors.torch import load_file

    for path in faults:  # repaired: complete and readable again
        rel = path.relative_to(run).as_posix()
        if path.suffix == ".safetensors":
            assert load_file(str(path)).keys() == load_file(str(clean / rel)).keys()
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            assert pq.read_table(path).num_rows == pq.read_table(clean / rel).num_rows
        elif path.suffix == ".json":
            assert json.loads(path.read_text())["accuracy"] == json.loads((clean / rel).read_text())["accuracy"]
        else:
            assert len(path.read_text().splitlines()) == len((clean / rel).read_text().splitlines())
    assert _sha(run / "trajectory" / "bottleneck" / "model.safetensors") == _sha(
        clean / "trajectory" / "bottleneck" / "model.safetensors")  # bit-identical to the uninterrupted run


def test_a_missing_held_out_set_fails_before_training_and_before_the_run_dir_exists(root, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(Pipeline, "stage_trajectory", lambda self: trained.append(1))
    for bad, msg in (("data.heldout=", "data.heldout is not set"),
                     (f"data.heldout={tmp_path}/none.jsonl", "none.jsonl does not exist")):
        with pytest.raises(ValueError, match=msg):
            run_pipeline(tiny_config(root, tmp_path / "run", bad), progress=False, log=lambda s: None)
    assert not trained and not (tmp_path / "run").exists()


def test_cli_errors_are_one_line_and_come_before_any_output(root, clean_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    assert main(["run", "empty.yaml"]) == 2
    assert "data.train is not set" in capsys.readouterr().err and not (tmp_path / "runs").exists()

    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"id": "a", "prompt": "1+1", "response": "2", "answer": "2"}\n{"prompt": "caf\xe9"}\n')
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    cfg = str(clean_run[0] / "config.yaml")
    cases = [
        (["run", cfg, f"data.train={bad_utf8}", f"run_dir={tmp_path}/r1"], f"{bad_utf8} line 2: not UTF-8"),
        (["run", cfg, f"model.path={empty_model}", f"run_dir={tmp_path}/r2"], "missing config.json, weights"),
        (["run", cfg, f"run_dir={tmp_path}/r3", "--redo", "trian_sft"], "--redo trian_sft: no such stage"),
        (["demo", "demo.bogus=1", f"run_dir={tmp_path}/r4"], "demo: unknown option(s) bogus"),
        (["demo", "demo.task.bogus=1", f"run_dir={tmp_path}/r4"], "demo.task: unknown option(s) bogus"),
        (["train", cfg, "--mode", "dllm", "dllm.mask_token_id=100000", "--out", f"{tmp_path}/r5"],
         "dllm.mask_token_id: 100000 is outside the model's vocabulary"),
        (["train", cfg, "--mode", "dllm", "dllm.mask_token_id=3.7", "--out", f"{tmp_path}/r5"],
         "dllm.mask_token_id: expected an integer"),
        (["train", cfg, "--mode", "dllm", "dllm.mask_token_id=-1", "--out", f"{tmp_path}/r5"],
         "dllm.mask_token_id: -1 is not a token id"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
    assert not any((tmp_path / f"r{i}").exists() for i in (1, 2, 3, 4, 5))


def test_provenance_records_threads_determinism_and_versions(clean_run):
    prov = json.loads((clean_run[0] / "provenance.json").read_text())
    assert prov["in_effect"]["torch_threads"] == prov["runtime"]["threads"] == 2
    assert prov["in_effect"]["deterministic_algorithms"] is True
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["transformers"]
    assert prov["blas"]["blas_info"] and prov["machine"]["cores"] >= 1


def _curve_run(root, tmp_path, curve: dict, *overrides: str):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({str(k): v for k, v in curve.items()}))
    # the default rule (Eq. 1: θ0 included), not tiny_config's plumbing departure
    return tiny_config(root, tmp_path / "run", f"accuracy.curve={path}", "bottleneck.min_step=0",
                       "variants=[sft,t3s,rrt]", "diagnostics.grad_stats=false", "diagnostics.delta_prob=false",
                       *overrides)


def test_a_rising_curve_stops_before_profiling_with_the_no_shock_message(root, tmp_path):
    from t3s.bottleneck import NoShockError

    cfg = _curve_run(root, tmp_path, {0: 0.5, 2: 0.75, 4: 1.0}, "bottleneck.on_no_shock=error")
    with pytest.raises(NoShockError, match=r"no Imitation Shock.*θb = θ0.*on_no_shock=proceed") as err:
        run_pipeline(cfg, progress=False, log=lambda s: None)
    assert "\n" not in str(err.value)
    run = tmp_path / "run"
    assert not (run / "profile").exists() and not (run / "bottleneck.json").exists()


def test_no_shock_with_the_override_runs_and_the_report_says_t3s_is_sft(root, tmp_path):
    cfg = _curve_run(root, tmp_path, {0: 0.5, 2: 0.75, 4: 1.0}, "bottleneck.on_no_shock=proceed")
    report = run_pipeline(cfg, progress=False, log=lambda s: None)
    run = tmp_path / "run"
    bn = json.loads((run / "bottleneck.json").read_text())
    assert bn["step"] == 0 and bn["shock"]["shock"] is False
    t3s = json.loads((run / "selections" / "t3s" / "selection.json").read_text())["stats"]
    assert t3s["num_selected"] == 0  # Δc ≡ 0: nothing is an anchor
    text = report.read_text()
    assert "T3S equals SFT" in text
    # the paper-silent choices with the values this run used (tiny_config: warm-up 1, lr 1e-2)
    assert "## Choices the paper leaves open" in text and "| cosine, warm-up 1, to 0 x lr |" in text
    assert "| baseline ranking | `select.ranking` | global |" in text and "lr 0.01 |" in text
    assert "dLLM block size" not in text  # an AR run


def test_a_real_drop_takes_the_minimum_and_warns_when_it_is_within_the_noise(root, tmp_path, monkeypatch):
    def stop(self, which):
        raise Crash("stopped after the bottleneck")

    monkeypatch.setattr(Pipeline, "stage_profile", stop)
    logs = []
    # 4 prompts: a drop of 0.25 is within 2 binomial standard errors (2 x 0.33)
    cfg = _curve_run(root, tmp_path, {0: 0.5, 2: 0.25, 4: 0.75})
    with pytest.raises(Crash):
        run_pipeline(cfg, progress=False, log=logs.append)
    bn = json.loads((tmp_path / "run" / "bottleneck.json").read_text())
    assert bn["step"] == 2 and bn["shock"]["shock"] and not bn["shock"]["clear"]
    assert any("within the measurement noise" in line and "0.250 below" in line for line in logs)
