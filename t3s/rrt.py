"""Recovering-Residual Transfer (paper §2.2): θ_RRT = θ0 + (θf − θb), keeping only post-bottleneck updates.

In the pipeline θb and θf come from the same SFT trajectory (its lowest-accuracy checkpoint and its final one),
as in the paper; only when the trajectory stopped early (``online`` / ``fixed`` with ``stop_early``) is θf the
separately trained SFT variant's final model.
"""

from __future__ import annotations

from pathlib import Path

import torch


def rrt_state_dict(base: dict[str, torch.Tensor], bottleneck: dict[str, torch.Tensor],
                   final: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base + (final − bottleneck)`` per tensor, computed in fp32 and cast back to the base dtype.

    Integer / bool buffers (e.g. position ids) are taken from ``base`` unchanged.

    Raises:
        ValueError: the three state dicts do not have the same keys and shapes.
    """
    if not (base.keys() == bottleneck.keys() == final.keys()):
        missing = (base.keys() ^ bottleneck.keys()) | (base.keys() ^ final.keys())
        raise ValueError(f"RRT needs three state dicts with the same keys; these differ: {sorted(missing)[:5]}")
    out = {}
    for k, b in base.items():
        if b.shape != bottleneck[k].shape or b.shape != final[k].shape:
            raise ValueError(f"RRT: tensor {k!r} has shapes {tuple(b.shape)}, {tuple(bottleneck[k].shape)}, "
                             f"{tuple(final[k].shape)}")
        if not b.is_floating_point():
            out[k] = b.clone()
            continue
        out[k] = (b.float() + (final[k].float() - bottleneck[k].float())).to(b.dtype)
    return out


def rrt_checkpoint(base_dir: str | Path, bottleneck_dir: str | Path, final_dir: str | Path,
                   out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                   trust_remote_code: bool = False) -> Path:
    """Build θ_RRT from three Hugging Face checkpoints and save it (atomically) to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    from t3s.train import load_tokenizer, save_hf_checkpoint

    def load(p):
        return AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code)

    base = load(base_dir)
    sd = rrt_state_dict(base.state_dict(), load(bottleneck_dir).state_dict(), load(final_dir).state_dict())
    tok = load_tokenizer(str(tokenizer_dir), trust_remote_code=trust_remote_code) if tokenizer_dir else None
    return save_hf_checkpoint(base, sd, out_dir, tok)
