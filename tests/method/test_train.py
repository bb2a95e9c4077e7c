"""The AR recipe on a tiny random Llama: exact gradient accumulation, token weights, packing, early stop at
the bottleneck, checkpoints, RRT arithmetic and batched generation."""

import json
import math

import pytest
import torch
from _tiny import tiny_config, tiny_examples

from t3s.data import IGNORE_INDEX
from t3s.generate import generate_greedy
from t3s.rrt import rrt_checkpoint, rrt_state_dict
from t3s.schedule import lr_lambda
from t3s.train import SFTRecipe, accuracy_hook, batch_schedule, load_model, run_training


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths, tok, examples = tiny_examples(root)
    return root, paths, tok, examples


def _recipe(assets, tmp_path, *overrides, examples=None, **kw):
    root, _, _, ex = assets
    r = SFTRecipe(tiny_config(root, tmp_path / "run", *overrides), examples or ex, tmp_path / "out", progress=False,
                  **kw)
    r.setup()
    return r


def _params(recipe):
    return {k: v.detach().clone() for k, v in recipe.lm.state_dict().items()}


def test_lr_schedule():
    kw = dict(total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_lambda(0, schedule="cosine", **kw) == 0.5 and lr_lambda(1, schedule="cosine", **kw) == 1.0
    assert lr_lambda(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_lambda(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_lambda(6, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(7, schedule="constant", **kw) == 1.0


def test_batch_schedule_is_seeded_and_wraps_epochs():
    a = batch_schedule(5, 4, 3, seed=1)
    assert a == batch_schedule(5, 4, 3, seed=1) and a != batch_schedule(5, 4, 3, seed=2)
    flat = [i for b in a for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    with pytest.raises(ValueError, match="no training examples"):
        batch_schedule(0, 4, 1, seed=0)


def test_gradient_accumulation_is_exact(assets, tmp_path):
    """One step of batch 4 as 1 x 4 or 4 x 1 micro-batches: same loss, same gradient (SGD lr 1: Δθ = −g)."""
    full = _recipe(assets, tmp_path, "train.micro_batch_size=4", "optim.max_grad_norm=null")
    acc = _recipe(assets, tmp_path, "train.micro_batch_size=1", "optim.max_grad_norm=null")
    for r in (full, acc):
        r.optimizer = torch.optim.SGD(r.policy.parameters(), lr=1.0)
        r.scheduler = torch.optim.lr_scheduler.LambdaLR(r.optimizer, lambda s: 1.0)
    idx = full.batches[0]
    a, b = full.train_step(idx), acc.train_step(idx)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"]
    pa, pb = _params(full), _params(acc)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-6


def test_token_weights_mask_tokens(assets, tmp_path):
    """The recipe's loss with a 0/1 selection is the mean NLL over the kept tokens only."""
    _, _, tok, examples = assets
    from dataclasses import replace

    weighted = []
    for e in examples:
        w = [float(lab != IGNORE_INDEX and j % 2 == 0) for j, lab in enumerate(e.labels)]
        weighted.append(replace(e, token_weight=w))
    r = _recipe(assets, tmp_path, "optim.lr=1e-9", examples=weighted)
    idx = r.batches[0]
    got = r.train_step(idx)["loss"]
    nll, n = 0.0, 0
    model = load_model(tiny_config(assets[0], tmp_path).model.path)
    with torch.no_grad():
        for i in idx:
            e = weighted[i]
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(e.input_ids[1:])[:, None])[:, 0]
            w = torch.tensor(e.token_weight[1:])
            nll += float(-(lp * w).sum())
            n += float(w.sum())
    assert got == pytest.approx(nll / n, rel=1e-5)


def test_packing_matches_padding(assets, tmp_path):
    a = _recipe(assets, tmp_path, "train.packing=false")
    b = _recipe(assets, tmp_path, "train.packing=true", "model.attn_implementation=sdpa")
    idx = a.batches[0]
    assert a.train_step(idx)["loss"] == pytest.approx(b.train_step(idx)["loss"], rel=1e-5)


def test_online_bottleneck_stops_early_and_keeps_theta_b(assets, tmp_path):
    """An injected accuracy curve: new minimum at step 2, then 2 evaluations without a lower one."""
    root, _, _, examples = assets
    cfg = tiny_config(root, tmp_path, "train.steps=8", "accuracy.every=1", "bottleneck.method=online",
                      "bottleneck.patience=2")
    curve = {0: 0.9, 1: 0.5, 2: 0.1, 3: 0.3, 4: 0.4, 5: 0.0, 6: 0.0, 7: 0.0, 8: 0.0}
    hook = accuracy_hook([], [], verifier=None, max_new_tokens=1, batch_size=1, curve=curve)
    res = run_training(cfg, examples, tmp_path / "traj", evaluate=[hook], track_bottleneck=True, save_final=False,
                       progress=False)
    assert res.stopped_early and res.steps_run == 4
    assert res.bottleneck["step"] == 2 and res.bottleneck["confirmed_at"] == 4
    assert (tmp_path / "traj" / "bottleneck" / "config.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "traj" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_accuracy"] for r in rows if "train_accuracy" in r] == [0.9, 0.5, 0.1, 0.3, 0.4]
    assert max(r["step"] for r in rows if "loss" in r) == 4
    # θb is the model after 2 steps: the same as a fresh 2-step run's final model.
    res2 = run_training(tiny_config(root, tmp_path, "train.steps=8"), examples, tmp_path / "two", steps=2,
                        progress=False)
    a = load_model(str(tmp_path / "traj" / "bottleneck")).state_dict()
    b = load_model(res2.final_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_bottleneck_stops_at_the_step(assets, tmp_path):
    root, _, _, examples = assets
    cfg = tiny_config(root, tmp_path, "train.steps=6", "bottleneck.method=fixed", "bottleneck.step=3",
                      "accuracy.every=10")
    res = run_training(cfg, examples, tmp_path / "traj", track_bottleneck=True, save_final=False, progress=False)
    assert res.steps_run == 3 and res.stopped_early and res.bottleneck["step"] == 3


def test_rrt_state_dict_arithmetic(tmp_path, assets):
    base = {"w": torch.tensor([1.0, 2.0]), "i": torch.tensor([3])}
    neck = {"w": torch.tensor([0.0, 0.0]), "i": torch.tensor([4])}
    final = {"w": torch.tensor([0.5, 1.0]), "i": torch.tensor([5])}
    out = rrt_state_dict(base, neck, final)
    assert torch.equal(out["w"], torch.tensor([1.5, 3.0])) and torch.equal(out["i"], torch.tensor([3]))
    with pytest.raises(ValueError, match="same keys"):
        rrt_state_dict(base, {"w": neck["w"]}, final)
    with pytest.raises(ValueError, match="shapes"):
        rrt_state_dict(base, {"w": torch.zeros(3), "i": neck["i"]}, final)
    # three distinct checkpoints, so a function returning any one of its inputs fails
    model = assets[1]["model"]
    theta = {"base": load_model(model).state_dict()}
    for name, seed, scale in (("neck", 1, 0.01), ("final", 2, 0.03)):
        m = load_model(model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        m.save_pretrained(tmp_path / name)
        theta[name] = m.state_dict()
    rrt_checkpoint(model, tmp_path / "neck", tmp_path / "final", tmp_path / "rrt")
    got = load_model(str(tmp_path / "rrt")).state_dict()
    assert got.keys() == theta["base"].keys()
    for k, v in got.items():
        b, n, f = (theta[x][k].double() for x in ("base", "neck", "final"))
        want = b + (f - n) if v.is_floating_point() else b
        assert torch.allclose(v.double(), want, rtol=0, atol=1e-6), k
    moved = [k for k, v in got.items() if v.is_floating_point()]
    assert moved and all(not torch.equal(got[k], theta[x][k]) for k in moved for x in theta)


def test_batched_left_padded_generation_matches_one_by_one(assets):
    _, paths, tok, examples = assets
    model = load_model(paths["model"])
    prompts = [e.input_ids[: e.response_start] for e in examples[:4]]
    prompts[1] = prompts[1][:-2] + prompts[1][-1:]  # different lengths
    kw = dict(max_new_tokens=5, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    batched = generate_greedy(model, prompts, batch_size=4, **kw)
    single = [generate_greedy(model, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == single
    for prompt, ours in zip(prompts, batched):  # Hugging Face's greedy decoding, cut before the end token
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        assert ours == (ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref)


def test_clear_errors(assets, tmp_path):
    root, _, _, examples = assets
    with pytest.raises(ValueError, match="not a local folder"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no training examples"):
        SFTRecipe(tiny_config(root, tmp_path), [], tmp_path / "x")
    from dataclasses import replace

    bad = [replace(examples[0], labels=[IGNORE_INDEX] * len(examples[0].labels))]
    with pytest.raises(ValueError, match="no response tokens"):
        SFTRecipe(tiny_config(root, tmp_path), bad, tmp_path / "x").setup()


def test_bf16_autocast_and_gradient_checkpointing_run(assets, tmp_path):
    plain = _recipe(assets, tmp_path)
    other = _recipe(assets, tmp_path, "train.autocast=bf16", "train.gradient_checkpointing=true")
    idx = plain.batches[0]
    a, b = plain.train_step(idx)["loss"], other.train_step(idx)["loss"]
    assert math.isfinite(b) and b == pytest.approx(a, rel=2e-2)
