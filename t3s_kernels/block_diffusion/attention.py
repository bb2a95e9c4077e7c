"""The 2L block-diffusion attention mask: a dense boolean reference, a FlexAttention ``mask_mod`` and a BlockMask.

Layout (BD3-LM, Arriola et al. ICLR'25, ``kuleshov-group/bd3lms@1c3e8f4`` ``models/dit.py:30-74``
``block_diff_mask``; made document-aware as LLaDA2.0 Eq. 3; anchors note §7): the model input is
``[x_t ‖ x_0]`` of length ``2L`` with position ids ``[pos ‖ pos]``. For query ``q`` and key ``k`` in ``[0, 2L)``,
``s(i) = 1[i ≥ L]`` (0 noisy, 1 clean), ``π(i) = i − L·s(i)``, ``blk(i) = (π(i) − doc_start(π(i))) // bs``::

    allowed(q, k) = same_doc(q, k) ∧ ( (blk(q) == blk(k) ∧ s(q) == s(k))      # noisy↔noisy in block; clean diag
                                     ∨ (blk(q) >  blk(k) ∧ s(q) = 0 ∧ s(k) = 1)  # noisy → earlier clean blocks
                                     ∨ (blk(q) >= blk(k) ∧ s(q) = 1 ∧ s(k) = 1))  # clean → clean, block-causal

Blocks are counted from each document's start; a partial last block is fine. Documents are contiguous runs of
equal ``document_ids``; positions with ``valid == False`` (pad) each get a document of their own, so no real token
attends a pad and every row keeps at least its own position (no empty rows, no NaN). The mask never depends on
the random mask, so it can be cached per layout.
"""

from __future__ import annotations

import torch

__all__ = [
    "block_diffusion_attention_mask",
    "block_diffusion_block_mask",
    "block_diffusion_mask_mod",
    "document_ids_from_cu_seqlens",
    "position_ids_from_document_ids",
]


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int | None = None) -> torch.Tensor:
    """int32 ``[1, T]`` document ids of a packed batch; tokens past ``cu_seqlens[-1]`` get one id each (pad)."""
    cu = cu_seqlens.to(torch.int64)
    T = int(cu[-1]) if total_len is None else int(total_len)
    lens = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens)
    tail = torch.arange(T - ids.numel(), device=cu.device) + lens.numel()
    return torch.cat([ids, tail]).to(torch.int32).view(1, T)


def _normalise(seq_len, document_ids, valid, device):
    if document_ids is None:
        if seq_len is None and valid is None:
            raise ValueError("give seq_len, document_ids or valid")
        if valid is not None:
            valid = valid if valid.dim() == 2 else valid.view(1, -1)
            document_ids = torch.zeros(valid.shape, dtype=torch.int64, device=valid.device)
        else:
            return None, int(seq_len)
    if not isinstance(document_ids, torch.Tensor) or document_ids.dtype.is_floating_point:
        raise TypeError("document_ids must be an integer tensor [B, L] or [L]")
    doc = document_ids if document_ids.dim() == 2 else document_ids.view(1, -1)
    doc = doc.to(device=device if device is not None else doc.device, dtype=torch.int64)
    if seq_len is not None and int(seq_len) != doc.shape[1]:
        raise ValueError(f"seq_len={seq_len} but document_ids has length {doc.shape[1]}")
    if valid is not None:
        valid = (valid if valid.dim() == 2 else valid.view(1, -1)).to(doc.device).bool()
        if valid.shape != doc.shape:
            raise ValueError(f"valid must have shape {tuple(doc.shape)}, got {tuple(valid.shape)}")
        # pads: a document of their own each (ids below every real id)
        L = doc.shape[1]
        pad_id = doc.min() - 1 - torch.arange(L, device=doc.device).expand_as(doc)
        doc = torch.where(valid, doc, pad_id)
    return doc, doc.shape[1]


def _doc_start(doc: torch.Tensor) -> torch.Tensor:
    """Index of the first position of each position's run of equal document id, ``[B, L]`` int64."""
    B, L = doc.shape
    pos = torch.arange(L, device=doc.device).expand(B, L)
    new = torch.ones_like(doc, dtype=torch.bool)
    new[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values


def position_ids_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Document-relative positions ``[B, L]`` (restart at 0 at each document start)."""
    doc = document_ids if document_ids.dim() == 2 else document_ids.view(1, -1)
    return torch.arange(doc.shape[1], device=doc.device) - _doc_start(doc.to(torch.int64))


def block_diffusion_attention_mask(
    block_size: int,
    *,
    seq_len: int | None = None,
    document_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense boolean ``[B, 2L, 2L]`` mask (``True`` = may attend; rows are queries) — the reference.

    Args:
        block_size: diffusion block size.
        seq_len: ``L`` when there is one document per row and no padding (``B = 1``).
        document_ids: int ``[B, L]`` or ``[L]``: contiguous runs are documents (packing).
        valid: bool ``[B, L]``: ``False`` marks pad positions (each becomes its own document).
        device: where to build it when only ``seq_len`` is given.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    doc, L = _normalise(seq_len, document_ids, valid, device)
    if doc is None:
        doc = torch.zeros(1, L, dtype=torch.int64, device=device)
    B = doc.shape[0]
    blk = (torch.arange(L, device=doc.device) - _doc_start(doc)) // block_size  # [B, L]
    doc2 = torch.cat([doc, doc], dim=1)  # [B, 2L]
    blk2 = torch.cat([blk, blk], dim=1)
    s2 = torch.cat([torch.zeros(L, dtype=torch.bool), torch.ones(L, dtype=torch.bool)]).to(doc.device)
    s2 = s2.expand(B, 2 * L)
    same = doc2[:, :, None] == doc2[:, None, :]
    bq, bk = blk2[:, :, None], blk2[:, None, :]
    sq, sk = s2[:, :, None], s2[:, None, :]
    diag = (bq == bk) & (sq == sk)
    obc = (bq > bk) & ~sq & sk
    bc = (bq >= bk) & sq & sk
    return same & (diag | obc | bc)


def block_diffusion_mask_mod(
    block_size: int,
    *,
    seq_len: int | None = None,
    document_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` equal to :func:`block_diffusion_attention_mask`.

    Without ``document_ids`` / ``valid`` it is BD3-LM's ``block_diff_mask`` (batch-independent, ``B=None``
    BlockMask); with them it looks up each position's document and document-relative block.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    doc, L = _normalise(seq_len, document_ids, valid, device)
    bs = block_size
    if doc is None:

        def mask_mod(b, h, q_idx, kv_idx):
            qc, kc = q_idx >= L, kv_idx >= L
            bq = torch.where(qc, q_idx - L, q_idx) // bs
            bk = torch.where(kc, kv_idx - L, kv_idx) // bs
            return ((bq == bk) & (qc == kc)) | ((bq > bk) & kc & ~qc) | ((bq >= bk) & kc & qc)

        return mask_mod
    doc = doc.to(torch.int32).contiguous()
    blk = ((torch.arange(L, device=doc.device) - _doc_start(doc.to(torch.int64))) // bs).to(torch.int32).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = q_idx >= L, kv_idx >= L
        qp = torch.where(qc, q_idx - L, q_idx)
        kp = torch.where(kc, kv_idx - L, kv_idx)
        same = doc[b, qp] == doc[b, kp]
        bq, bk = blk[b, qp], blk[b, kp]
        return same & (((bq == bk) & (qc == kc)) | ((bq > bk) & kc & ~qc) | ((bq >= bk) & kc & qc))

    return mask_mod


def block_diffusion_block_mask(
    block_size: int,
    *,
    seq_len: int | None = None,
    document_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int = 128,
    compile: bool = False,
):
    """FlexAttention ``BlockMask`` over ``[2L, 2L]`` for :func:`block_diffusion_mask_mod`.

    ``BLOCK_SIZE`` is FlexAttention's sparsity tile (not the diffusion block); partial tiles apply the
    ``mask_mod`` element-wise, so any diffusion block size is exact. ``compile=True`` builds it with
    ``torch.compile`` (recommended on GPU for long sequences: the eager builder evaluates the full mask).
    Build once per batch layout and reuse across layers.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    doc, L = _normalise(seq_len, document_ids, valid, device)
    dev = torch.device(device) if device is not None else (doc.device if doc is not None else torch.device("cpu"))
    mask_mod = block_diffusion_mask_mod(block_size, seq_len=L, document_ids=doc, device=dev)
    B = None if doc is None else doc.shape[0]
    return create_block_mask(
        mask_mod, B=B, H=None, Q_LEN=2 * L, KV_LEN=2 * L, device=dev, BLOCK_SIZE=BLOCK_SIZE, _compile=compile
    )
