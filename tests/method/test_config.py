import pytest

from t3s.cli import main
from t3s.config import Config, ConfigError, config_path, documented_yaml, load_config, parse_overrides


def test_packaged_default_yaml_documents_the_defaults():
    assert load_config(config_path("default")) == Config()


def test_packaged_demo_yaml_loads():
    cfg = load_config(config_path("demo"))
    assert cfg.train.steps > 0 and "t3s" in cfg.variants


def test_overrides_are_coerced_to_the_field_types():
    cfg = load_config(None, ["optim.lr=5e-4", "train.steps=30", "variants=[sft,t3s]", "bottleneck.stop_early=false",
                             "accuracy.num_prompts=null", "optim.max_grad_norm=none", "dllm.block_size=4",
                             "eval.style_patterns={b: boxed}", "optim.betas=[0.9,0.999]"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 30 and cfg.variants == ["sft", "t3s"]
    assert cfg.bottleneck.stop_early is False and cfg.accuracy.num_prompts is None
    assert cfg.optim.max_grad_norm is None and cfg.dllm == {"block_size": 4}
    assert cfg.eval.style_patterns == {"b": "boxed"} and cfg.optim.betas == [0.9, 0.999]


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 8\noptim: {lr: 1e-3}\n")
    cfg = load_config(path, ["train.steps=9"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr) == (9, 8, 1e-3)


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr", "optim.lr"]),
    ("trian.steps=3", ["trian.steps", "train.steps"]),
    ("lr=1", ["'lr'", "optim.lr"]),
    ("train.nosuchthing=1", ["train.nosuchthing"]),
])
def test_unknown_key_names_it_and_suggests(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(path)


@pytest.mark.parametrize("override, match", [
    ("train.steps=abc", "train.steps: expected an integer"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("train.packing=maybe", "train.packing: expected true/false"),
    ("bottleneck.method=smart", "bottleneck.method: must be one of"),
    ("variants=[sft,t4s]", "variants: unknown 't4s'"),
    ("accuracy.num_samples=4", "greedy decoding repeats"),
    ("generation.backend=sglang", "generation.backend: must be one of"),
    ("train.batch_size=10", "multiple of"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("optim=3", "optim: is a section"),
    ("train.steps", "not of the form key=value"),
])
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_rrt_needs_an_sft_run_only_when_the_trajectory_stops_early():
    # argmin (the default) runs the whole trajectory: its final checkpoint is θf.
    assert load_config(None, ["variants=[t3s,rrt]"]).bottleneck.method == "argmin"
    with pytest.raises(ConfigError, match="rrt needs θf"):
        load_config(None, ["variants=[t3s,rrt]", "bottleneck.method=online"])
    load_config(None, ["variants=[t3s,rrt]", "bottleneck.method=online", "bottleneck.stop_early=false"])


def test_paper_defaults():
    cfg = load_config(None, [])
    assert cfg.bottleneck.method == "argmin" and cfg.bottleneck.step == 10  # Eq. 1; T3S-simple at step 10
    assert cfg.accuracy.max_new_tokens is None and cfg.eval.max_new_tokens is None  # derived from the traces
    assert cfg.select.tau == 0.2 and cfg.select.threshold == 0.0 and cfg.select.always_train_eos
    assert cfg.model.trust_remote_code is False and cfg.generation.backend == "hf"
    from t3s.dllm import DLLMConfig

    assert DLLMConfig().weight_mode == "uniform"  # Eq. 10: unweighted sum over the union mask


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_parse_overrides_yaml_values():
    assert parse_overrides(["a.b=1", "c=[x, y]", "d=", "e=a=b"]) == [("a.b", 1), ("c", ["x", "y"]), ("d", ""),
                                                                     ("e", "a=b")]


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: " + str(tmp_path / "run") + "\n")
    assert main(["run", str(path), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "optim.lr" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_default_yaml_is_the_generated_documentation():
    from t3s.config import documented_yaml

    assert config_path("default").read_text(encoding="utf-8") == documented_yaml(), (
        "regenerate: python -c \"from t3s.config import documented_yaml; "
        "open('t3s/configs/default.yaml','w').write(documented_yaml())\"")


def test_paper_silent_choices_are_read_from_the_config():
    from t3s.choices import paper_silent_choices

    cfg = load_config(None, ["optim.betas=[0.9, 0.999]", "select.ranking=per_sequence", "train.mode=dllm",
                             "dllm.block_size=8"])
    rows = {r["choice"]: r for r in paper_silent_choices(cfg)}
    assert rows["Adam betas / eps"]["value"].startswith("(0.9, 0.999)")
    assert rows["baseline ranking"]["value"] == "per_sequence" and rows["dLLM block size"]["value"] == "8"
    assert all(r["why"] for r in rows.values())
    for key in ("weight decay", "gradient clipping", "training-accuracy protocol", "loss normaliser",
                "dLLM noise window", "one-step intervention (Fig. 5)", "Table 6 easy/hard split",
                "end tokens in the diagnostics", "θb ties, θ0, noise"):
        assert key in rows
    assert "Choices the paper leaves open" in documented_yaml()
