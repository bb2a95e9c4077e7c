"""Hugging Face Trainer / TRL with a T3S selection: one optimizer step (2 micro-batches × 2 examples, SGD lr 1, no
clipping) equals t3s's own recipe on the same 4 examples: same loss, same parameter update (Δθ = −g)."""

import numpy as np
import pytest
import torch
from _tiny import tiny_config, tiny_examples

from t3s.data import IGNORE_INDEX
from t3s.select import Selection, apply_selection, save_selection
from t3s.train import SFTRecipe, load_model

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths, tok, examples = tiny_examples(root)
    rng = np.random.default_rng(0)
    positions = [np.nonzero(np.asarray(e.labels) != IGNORE_INDEX)[0] for e in examples]
    weights = [(rng.random(len(p)) < 0.6).astype(np.float32) for p in positions]
    sel = Selection("t3s", "loss_weight", [e.id for e in examples], [list(e.input_ids) for e in examples],
                    positions, weights)
    sel_dir = save_selection(sel, root / "selection")
    return root, paths, tok, examples, sel_dir


def _recipe_step(setting, tmp_path):
    root, _, _, examples, sel_dir = setting
    from t3s.select import load_selection

    weighted = apply_selection(examples, load_selection(sel_dir))
    r = SFTRecipe(tiny_config(root, tmp_path / "run", "optim.max_grad_norm=null", "train.batch_size=4",
                              "train.micro_batch_size=2"), weighted, tmp_path / "out", progress=False)
    r.setup()
    r.optimizer = torch.optim.SGD(r.policy.parameters(), lr=1.0)
    r.scheduler = torch.optim.lr_scheduler.LambdaLR(r.optimizer, lambda s: 1.0)
    idx = r.batches[0]
    before = {k: v.detach().clone() for k, v in r.lm.state_dict().items()}
    row = r.train_step(idx)
    after = {k: v.detach().clone() for k, v in r.lm.state_dict().items()}
    return idx, row["loss"], {k: after[k] - before[k] for k in before}


def _trainer(setting, tmp_path, idx, *, use_loss_func: bool, trl: bool = False):
    from transformers import Trainer, TrainingArguments

    from t3s.integrations.hf_trainer import SelectionCollator, T3SCausalLM, t3s_sft_trainer, tokenized_dataset

    _, paths, tok, examples, sel_dir = setting
    lm = load_model(paths["model"])
    model = T3SCausalLM(lm)
    data = tokenized_dataset([examples[i] for i in idx])
    collator = SelectionCollator(sel_dir, pad_token_id=tok.pad_token_id)
    common = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=1, max_grad_norm=0.0, remove_unused_columns=False, report_to=[], use_cpu=True,
                  save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    params = (lm if trl else model).parameters()
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    if trl:
        from datasets import Dataset
        from trl import SFTConfig

        args = SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = t3s_sft_trainer()(model=lm, args=args, train_dataset=Dataset.from_list(data),
                                    data_collator=collator, processing_class=tok, optimizers=(opt, sched))
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, data_collator=collator,
                          compute_loss_func=model.compute_loss if use_loss_func else None, optimizers=(opt, sched))
    out = trainer.train()
    after = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    return out.training_loss, {k: after[k] - before[k] for k in before}


@pytest.mark.parametrize("use_loss_func", [True, False], ids=["compute_loss_func", "forward_loss"])
def test_trainer_step_matches_t3s_recipe(setting, tmp_path, use_loss_func):
    idx, loss, delta = _recipe_step(setting, tmp_path)
    hf_loss, hf_delta = _trainer(setting, tmp_path, idx, use_loss_func=use_loss_func)
    assert hf_loss == pytest.approx(loss, rel=1e-5)
    scale = max(v.abs().max().item() for v in delta.values())
    assert scale > 0
    assert max((delta[k] - hf_delta[k]).abs().max().item() for k in delta) <= 1e-5 * scale


def test_trl_sft_trainer_step_matches_t3s_recipe(setting, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    idx, loss, delta = _recipe_step(setting, tmp_path)
    hf_loss, hf_delta = _trainer(setting, tmp_path, idx, use_loss_func=False, trl=True)
    assert hf_loss == pytest.approx(loss, rel=1e-5)
    scale = max(v.abs().max().item() for v in delta.values())
    assert max((delta[k] - hf_delta[k]).abs().max().item() for k in delta) <= 1e-5 * scale


def test_collator_weights_and_errors(setting):
    from t3s.integrations.hf_trainer import SelectionCollator, tokenized_dataset

    _, _, tok, examples, sel_dir = setting
    from t3s.select import load_selection

    sel = load_selection(sel_dir)
    col = SelectionCollator(sel, pad_token_id=tok.pad_token_id)
    rows = tokenized_dataset(examples[:3])
    batch = col(rows)
    for r, e in enumerate(examples[:3]):
        pos, w = sel.weight_for(e.id)
        dense = np.zeros(len(e))
        dense[pos] = w
        dense[0] = 0
        got = batch["token_weight"][r, : len(e)].numpy()
        assert np.array_equal(got, dense)
        assert ((batch["labels"][r, : len(e)] != IGNORE_INDEX).numpy() == (dense > 0)).all()
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        col([{"input_ids": [1, 2], "labels": [1, 2]}])
    bad = dict(rows[0], input_ids=[rows[0]["input_ids"][0]] + rows[0]["input_ids"][:-1])
    with pytest.raises(ValueError, match="tokenized differently"):
        col([bad])
    with pytest.raises(ValueError, match="not in the selection"):
        col([dict(rows[0], id="nope")])
