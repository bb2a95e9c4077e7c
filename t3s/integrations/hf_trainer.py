"""Train with a T3S selection from ``transformers.Trainer`` or TRL's ``SFTTrainer``, without ``t3s run``.

Three pieces:

* :class:`SelectionCollator` pads tokenized examples (dicts with ``id``, ``input_ids``, ``labels``) and attaches
  ``token_weight`` from a selection folder (:func:`t3s.select.save_selection`), checking that each example was
  tokenized exactly as profiled. Labels at weight-0 positions (and at position 0, never predicted) become ``-100``,
  so the Trainer's own ``num_items_in_batch`` (non-``-100`` shifted labels of the whole accumulated batch, gathered
  over ranks) is exactly the token weight of the optimizer step: gradient accumulation is exact for 0/1 selections
  (t3s's rules); for fractional weights the step is normalised by the count of weighted tokens instead of by
  ``Σ w``.
* :class:`T3SCausalLM` wraps a Hugging Face causal LM (a :class:`~t3s_kernels.FusedLossCausalLM`, so the
  ``[tokens, vocab]`` logits never exist). Called without ``labels`` (what the Trainer does when it has a
  ``compute_loss_func``) it returns the trunk's hidden states; :meth:`T3SCausalLM.compute_loss` is that
  ``compute_loss_func``. Called with ``labels`` (no ``compute_loss_func``) it computes the same loss inside its own
  forward, which is what FSDP needs (the head weight is gathered only inside the forward).
* :func:`t3s_sft_trainer` returns an ``SFTTrainer`` subclass (TRL is an optional extra): TRL's own loss path feeds
  ``compute_loss_func`` materialised logits and computes metrics from a second forward, so the hook is a
  ``compute_loss`` override that runs the fused, token-weighted loss through the (possibly wrapped) model.

Example (also in the README)::

    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from t3s.integrations.hf_trainer import SelectionCollator, T3SCausalLM, tokenized_dataset

    model = T3SCausalLM(AutoModelForCausalLM.from_pretrained("path/to/theta0"))
    trainer = Trainer(
        model=model,
        args=TrainingArguments("out", per_device_train_batch_size=8, gradient_accumulation_steps=8,
                               remove_unused_columns=False),  # keep the `id` column for the collator
        train_dataset=tokenized_dataset(examples),             # t3s.data.TokenizedExample list -> dict rows
        data_collator=SelectionCollator("run/select/t3s", pad_token_id=tokenizer.pad_token_id),
        compute_loss_func=model.compute_loss,                  # omit under FSDP: the forward then owns the loss
    )
    trainer.train()
    model.model.save_pretrained("out/final")                   # the plain Hugging Face checkpoint
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import ModelOutput

from t3s.data import IGNORE_INDEX, TokenizedExample, collate
from t3s.select import Selection, apply_selection, load_selection
from t3s_kernels import FusedLossCausalLM, linear_cross_entropy

__all__ = ["SelectionCollator", "T3SCausalLM", "T3SCausalLMOutput", "scored_rows", "t3s_sft_trainer",
           "tokenized_dataset"]


def tokenized_dataset(examples: Sequence[TokenizedExample]) -> list[dict]:
    """``TokenizedExample`` objects as the dict rows a Trainer dataset yields (``id``, ``input_ids``, ``labels``)."""
    return [{"id": e.id, "input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]


class SelectionCollator:
    """Pad examples and attach the selection's per-token weights (a ``data_collator`` for the Trainer).

    Args:
        selection: a :class:`~t3s.select.Selection` or a selection folder (``selection.parquet`` +
            ``selection.json``). ``None``: plain SFT (weight 1 on every labelled token).
        pad_token_id: padding id for ``input_ids``.
        strict: an example whose id is not in the selection raises ``ValueError``; with ``False`` it keeps all
            its tokens.
        pad_to_multiple_of: pad the length to a multiple of this.

    Each feature needs ``id``, ``input_ids`` and ``labels`` (``-100`` on prompt tokens, unshifted: the tokenization
    the profile scored). Returns ``input_ids``, ``attention_mask``, ``labels`` (``-100`` where the weight is 0),
    ``token_weight`` (``[B, T]`` fp32, aligned with ``labels``) and ``active_rows`` (int64 flat indices of the
    scored positions, computed on the host: the loss then needs no device-to-host read; a batch split along its
    first dimension after collation, e.g. by accelerate's ``dispatch_batches``, must drop it).
    """

    def __init__(self, selection: Selection | str | Path | None, *, pad_token_id: int, strict: bool = True,
                 pad_to_multiple_of: int | None = None):
        if isinstance(selection, str | Path):
            selection = load_selection(selection)
        if selection is not None and not isinstance(selection, Selection):
            kind = type(selection).__name__
            raise TypeError(f"selection must be a Selection, a selection folder or None, got {kind}")
        if selection is not None and selection.meaning != "loss_weight":
            raise ValueError(f"selection rule {selection.rule!r} marks dLLM targets, not AR loss weights; use an AR "
                             "rule (t3s, neg_t3s, static_*, random) with the causal-LM Trainer")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
        self.selection, self.pad_token_id, self.strict = selection, pad_token_id, strict
        self.pad_to_multiple_of = pad_to_multiple_of

    @staticmethod
    def _example(feature: Mapping[str, Any]) -> TokenizedExample:
        missing = [k for k in ("id", "input_ids", "labels") if k not in feature]
        if missing:
            raise ValueError(f"SelectionCollator: feature is missing {missing} (has {sorted(feature)}); pass "
                             "remove_unused_columns=False to TrainingArguments so the `id` column reaches the collator")
        ids, labels = [int(t) for t in feature["input_ids"]], [int(t) for t in feature["labels"]]
        if len(ids) != len(labels):
            raise ValueError(f"example {feature['id']!r}: input_ids and labels differ in length")
        start = next((j for j, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
        return TokenizedExample(str(feature["id"]), ids, labels, start)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [self._example(f) for f in features]
        if self.selection is not None:
            examples = apply_selection(examples, self.selection, strict=self.strict)
        batch = collate(examples, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        labels = batch["labels"]
        weight = batch.get("token_weight")
        if weight is None:
            weight = (labels != IGNORE_INDEX).float()
        labels = labels.masked_fill(weight == 0, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX  # position 0 has no prefix: never predicted, never counted
        batch.pop("target_mask", None)
        batch["labels"] = labels
        batch["token_weight"] = weight * (labels != IGNORE_INDEX)
        # built here, on the host where the mask is born: the loss gathers these rows without reading a count
        # back from the device (no host sync per step)
        batch["active_rows"] = scored_rows(labels)
        return batch


def scored_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``[B, T]`` of the hidden states the shifted loss scores (row ``t`` predicts
    ``labels[:, t + 1]``, which is not ``-100``): ``active_rows`` of :func:`t3s_kernels.linear_cross_entropy`."""
    scored = torch.zeros(labels.shape, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return torch.nonzero(scored.reshape(-1)).reshape(-1)


@dataclass
class T3SCausalLMOutput(ModelOutput):
    """``loss`` (with ``labels``) or the trunk's ``hidden_states``, the batch's ``token_weight`` and ``active_rows``
    (without)."""

    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    token_weight: torch.Tensor | None = None
    active_rows: torch.Tensor | None = None


class T3SCausalLM(FusedLossCausalLM):
    """A Hugging Face causal LM whose training loss is the fused, token-weighted cross-entropy.

    Same options as :class:`~t3s_kernels.FusedLossCausalLM`. ``forward(input_ids, attention_mask, labels=None,
    token_weight=None, num_items_in_batch=None, ...)``: with ``labels`` the loss is computed here
    (``Σ wᵢ·lossᵢ / num_items_in_batch``, or the weighted mean when the Trainer passes none); without, the hidden
    states are returned for :meth:`compute_loss`. ``model.model`` is the wrapped Hugging Face model.
    """

    def forward(self, input_ids: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
                token_weight: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | float | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                active_rows: torch.Tensor | None = None, **model_kwargs: Any) -> T3SCausalLMOutput:
        model_kwargs.pop("shift_labels", None)  # the loss shifts labels itself
        if labels is not None:
            out = super().forward(input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
                                  token_weight=token_weight, num_items_in_batch=num_items_in_batch,
                                  active_rows=active_rows, **model_kwargs)
            return T3SCausalLMOutput(loss=out.loss)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, **model_kwargs)
        return T3SCausalLMOutput(hidden_states=hidden, token_weight=token_weight, active_rows=active_rows)

    def compute_loss(self, outputs: T3SCausalLMOutput, labels: torch.Tensor,
                     num_items_in_batch: torch.Tensor | float | None = None) -> torch.Tensor:
        """The ``compute_loss_func`` of ``transformers.Trainer``: fused loss from ``outputs.hidden_states``.

        Returns ``Σ wᵢ·lossᵢ / num_items_in_batch`` (the Trainer's token count of the whole accumulated batch,
        so accumulation is exact and the Trainer does not rescale it), or the weighted mean of this batch.
        """
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None or hidden.dim() != 3:
            raise ValueError("T3SCausalLM.compute_loss needs the outputs of T3SCausalLM called without labels "
                             "(is compute_loss_func paired with a T3SCausalLM model?)")
        if labels is None:
            raise ValueError("T3SCausalLM.compute_loss needs labels (the batch has no `labels` column)")
        h, weight, bias = self._head_tensors(hidden)
        normalizer = num_items_in_batch
        if isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.reshape(())
        return linear_cross_entropy(
            h, weight, labels.to(h.device), bias=bias, token_weight=outputs.token_weight,
            ignore_index=self.ignore_index, reduction="mean", normalizer=normalizer,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            temperature=self.temperature, shift=True, impl=self.impl, strategy=self.strategy,
            active_rows=getattr(outputs, "active_rows", None),
        )


def t3s_sft_trainer():
    """TRL's ``SFTTrainer`` with the fused, token-weighted loss (TRL installed: ``pip install t3s[trl]``).

    Use it like ``SFTTrainer`` with ``model=`` a plain Hugging Face causal LM, ``data_collator=``
    :class:`SelectionCollator`, a pre-tokenized dataset (:func:`tokenized_dataset`) and
    ``args=SFTConfig(..., remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})``. Each
    micro-batch's loss is ``Σ wᵢ·lossᵢ / num_items_in_batch`` computed by :class:`T3SCausalLM` over the trainer's
    (unwrapped) model; TRL's entropy / token-accuracy metrics are not computed (they would need the logits).
    Single process (the loss reaches the model without going through a DDP / FSDP wrapper's forward).
    """
    try:
        from trl import SFTTrainer
    except ImportError as err:
        raise ImportError("t3s_sft_trainer needs TRL: pip install 't3s[trl]'") from err

    class T3SSFTTrainer(SFTTrainer):
        """``SFTTrainer`` whose ``compute_loss`` is the fused, token-weighted cross-entropy (see
        :func:`t3s_sft_trainer`)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inner = self.accelerator.unwrap_model(model)
            loss_model = getattr(self, "_t3s_loss_model", None)
            if loss_model is None or loss_model.model is not inner:
                loss_model = self._t3s_loss_model = T3SCausalLM(inner)
            inputs = dict(inputs)
            inputs.pop("use_cache", None)
            out = loss_model(**inputs, num_items_in_batch=num_items_in_batch)
            loss = out.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, out) if return_outputs else loss

    return T3SSFTTrainer
