"""Generation backends: the HF loop (finish reasons, sampling), the vLLM adapter against a fake engine with vLLM's
interface, and the real vLLM on a GPU."""

import sys
import types

import pytest
import torch
from _tiny import make_tiny

from t3s.answers import get_verifier
from t3s.generate import (
    HFBackend,
    SamplingConfig,
    VLLMBackend,
    answer_accuracy,
    encode_prompt,
    generate_greedy,
    stop_token_ids,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from t3s.train import load_model, load_tokenizer

    paths = make_tiny(tmp_path_factory.mktemp("gen"))
    tok = load_tokenizer(paths["model"])
    return paths, load_model(paths["model"]), tok


def _prompts(tok):
    return [encode_prompt(tok, p) for p in ("12 + 3 =", "7 * 2 =", "20 - 9 =")]


def test_hf_backend_greedy_matches_the_plain_loop_and_reports_truncation(tiny):
    _, model, tok = tiny
    prompts = _prompts(tok)
    eos = stop_token_ids(model, tok)
    out = HFBackend(model, tok, batch_size=2).generate(prompts, SamplingConfig(max_new_tokens=5))
    ref = generate_greedy(model, prompts, max_new_tokens=5, eos_token_ids=eos, pad_token_id=tok.pad_token_id)
    assert [o[0].token_ids for o in out] == ref
    for (c,), r in zip(out, ref, strict=True):
        assert c.finish_reason == ("length" if len(r) == 5 else "stop")
        assert c.text == tok.decode(r, skip_special_tokens=True)


def test_sampling_is_seeded_and_nucleus_of_one_token_is_greedy(tiny):
    _, model, tok = tiny
    prompts, be = _prompts(tok), HFBackend(model, tok)
    hot = SamplingConfig(max_new_tokens=6, temperature=1.5, num_samples=3, seed=7)
    a, b = be.generate(prompts, hot), be.generate(prompts, hot)
    assert [[c.token_ids for c in x] for x in a] == [[c.token_ids for c in x] for x in b]
    assert all(len(x) == 3 for x in a)
    other = be.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=1.5, num_samples=3, seed=8))
    assert [[c.token_ids for c in x] for x in a] != [[c.token_ids for c in x] for x in other]
    greedy = be.generate(prompts, SamplingConfig(max_new_tokens=6))
    nucleus = be.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1e-6))
    assert [x[0].token_ids for x in nucleus] == [x[0].token_ids for x in greedy]


@pytest.mark.parametrize("kw, match", [({"max_new_tokens": 0}, "max_new_tokens"),
                                       ({"max_new_tokens": 4, "num_samples": 2}, "greedy"),
                                       ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
                                       ({"max_new_tokens": 4, "temperature": -1.0}, "temperature")])
def test_bad_sampling_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)


def test_answer_accuracy_counts_truncated_and_answerless_completions(tiny):
    _, model, tok = tiny
    res = answer_accuracy(model, tok, _prompts(tok), ["15", "14", "11"], verifier=get_verifier("auto"),
                          max_new_tokens=3)
    assert res.total == 3 and res.num_prompts == 3
    assert res.truncated == sum(n == 3 for n in res.completion_tokens)
    assert res.no_answer == 3  # a random model writes no \boxed{} / ####
    m = res.metrics("train")
    assert m["train_no_answer_fraction"] == 1.0 and m["train_truncated_fraction"] == res.truncated / 3


# ---- vLLM ---------------------------------------------------------------------------------------------------


class _FakeVLLM(types.SimpleNamespace):
    """vLLM's interface: ``LLM(model=..., tensor_parallel_size=...)``, ``SamplingParams(...)``, ``generate()``
    returning RequestOutput-like objects with ``.outputs[i].text / token_ids / finish_reason``."""


def _fake_vllm(log):
    class SamplingParams:
        def __init__(self, **kw):
            log["sampling"] = kw
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            log["engine"] = kw

        def generate(self, prompts, sampling_params, use_tqdm=True):
            log["prompts"] = prompts
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"]
                comps = []
                for i in range(sampling_params.kw["n"]):
                    n = sampling_params.kw["max_tokens"] if i == 0 else 1
                    toks = [(ids[-1] + j) % 50 for j in range(n)]
                    comps.append(types.SimpleNamespace(text=" ".join(map(str, toks)), token_ids=tuple(toks),
                                                       finish_reason="length" if i == 0 else "stop"))
                outs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=comps))
            return outs

    return _FakeVLLM(LLM=LLM, SamplingParams=SamplingParams)


def test_vllm_adapter_maps_the_engine_and_sampling_settings():
    log = {}
    be = VLLMBackend("/ckpt/step_000004", tokenizer="/tok", tensor_parallel_size=8, dtype="bfloat16",
                     trust_remote_code=True, max_model_len=40000, engine_kwargs={"enforce_eager": True},
                     vllm_module=_fake_vllm(log))
    assert log["engine"] == {"model": "/ckpt/step_000004", "tokenizer": "/tok", "tensor_parallel_size": 8,
                             "dtype": "bfloat16", "trust_remote_code": True, "gpu_memory_utilization": 0.9,
                             "enforce_eager": True, "max_model_len": 40000}
    s = SamplingConfig(max_new_tokens=4, temperature=0.6, top_p=0.95, num_samples=2, seed=3)
    out = be.generate([[1, 2, 3], [9]], s, stop_ids=[7])
    assert log["sampling"] == {"n": 2, "temperature": 0.6, "top_p": 0.95, "max_tokens": 4, "seed": 3,
                               "skip_special_tokens": True, "stop_token_ids": [7]}
    assert log["prompts"] == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [9]}]
    assert [[c.finish_reason for c in x] for x in out] == [["length", "stop"], ["length", "stop"]]
    assert out[0][0].token_ids == [3, 4, 5, 6] and out[0][0].text == "3 4 5 6"
    be.close()
    be.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        be.generate([[1]], s)


def test_vllm_adapter_feeds_answer_accuracy():
    be = VLLMBackend("/m", tokenizer="/m", vllm_module=_fake_vllm({}))
    res = answer_accuracy(be, None, [[1], [2]], ["1 2", "x"], verifier=lambda c, g: c == g,
                          sampling=SamplingConfig(max_new_tokens=2))
    assert (res.correct, res.total, res.truncated) == (1, 2, 2)


def test_vllm_is_never_imported_unless_selected_and_missing_is_a_clear_error(monkeypatch):
    import subprocess

    code = "import sys, t3s.generate, t3s.pipeline; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"t3s\[vllm\]"):
        VLLMBackend("/m", tokenizer="/m")


@pytest.mark.gpu
def test_real_vllm_matches_hf_greedy(tiny):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    paths, model, tok = tiny
    prompts = _prompts(tok)
    s = SamplingConfig(max_new_tokens=8)
    hf = HFBackend(model, tok).generate(prompts, s)
    with VLLMBackend(paths["model"], tokenizer=paths["model"], dtype="float32", gpu_memory_utilization=0.3,
                     engine_kwargs={"enforce_eager": True}) as be:
        vl = be.generate(prompts, s, stop_ids=stop_token_ids(model, tok))
    assert [x[0].token_ids for x in vl] == [x[0].token_ids for x in hf]
