"""The 2L block-diffusion attention mask: dense reference vs BD3-LM's definition, FlexAttention mask_mod /
BlockMask vs the dense reference (element for element, and through attention outputs)."""

from __future__ import annotations

import pytest
import torch

from t3s_kernels.block_diffusion import (
    block_diffusion_attention_mask,
    block_diffusion_block_mask,
    block_diffusion_mask_mod,
    document_ids_from_cu_seqlens,
    position_ids_from_document_ids,
)

HAS_CUDA = torch.cuda.is_available()


def bd3lm_block_diff_mask(b, h, q_idx, kv_idx, block_size=None, n=None):
    """Transcribed from kuleshov-group/bd3lms@1c3e8f4 models/dit.py:30-74 (block_diff_mask)."""
    x0_flag_q = q_idx >= n
    x0_flag_kv = kv_idx >= n
    block_q = torch.where(x0_flag_q == 1, (q_idx - n) // block_size, q_idx // block_size)
    block_kv = torch.where(x0_flag_kv == 1, (kv_idx - n) // block_size, kv_idx // block_size)
    block_diagonal = (block_q == block_kv) & (x0_flag_q == x0_flag_kv)
    offset_block_causal = (block_q > block_kv) & (x0_flag_kv == 1) & (x0_flag_q == 0)
    block_causal = (block_q >= block_kv) & (x0_flag_kv == 1) & (x0_flag_q == 1)
    return block_diagonal | offset_block_causal | block_causal


def bd3lm_dense(L, bs):
    i = torch.arange(2 * L)
    return bd3lm_block_diff_mask(None, None, i[:, None], i[None, :], block_size=bs, n=L)


def random_layout(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    doc = torch.zeros(B, L, dtype=torch.int64)
    for b in range(B):
        cuts = sorted(torch.randint(1, L, (3,), generator=g).tolist())
        for c in cuts:
            doc[b, c:] += 1
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, L - 5 :] = False  # trailing pad on one row
    return doc, valid


@pytest.mark.parametrize("L,bs", [(12, 4), (13, 4), (16, 1), (10, 10), (9, 16), (37, 5)])
def test_single_document_equals_bd3lm(L, bs):
    ours = block_diffusion_attention_mask(bs, seq_len=L)
    assert ours.shape == (1, 2 * L, 2 * L) and ours.dtype == torch.bool
    assert torch.equal(ours[0], bd3lm_dense(L, bs))


def test_sparsity_formula():
    L, bs = 64, 8
    frac = block_diffusion_attention_mask(bs, seq_len=L).float().mean().item()
    assert frac == pytest.approx(0.25 + bs / (4 * L))  # anchors note §7.3


def test_packed_documents_are_block_diagonal_copies():
    lens, bs = [7, 12, 5], 4
    cu = torch.tensor([0, 7, 19, 24])
    doc = document_ids_from_cu_seqlens(cu)
    L = 24
    m = block_diffusion_attention_mask(bs, document_ids=doc)[0]
    expect = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for d, n in enumerate(lens):
        s = int(cu[d])
        sub = bd3lm_dense(n, bs)  # blocks restart at the document start
        for qh in range(2):
            for kh in range(2):
                expect[qh * L + s : qh * L + s + n, kh * L + s : kh * L + s + n] = sub[qh * n : (qh + 1) * n,
                                                                                       kh * n : (kh + 1) * n]
    assert torch.equal(m, expect)
    pos = position_ids_from_document_ids(doc)
    assert pos[0].tolist() == list(range(7)) + list(range(12)) + list(range(5))


def test_padding_rows_attend_only_themselves():
    L, bs = 10, 4
    valid = torch.ones(1, L, dtype=torch.bool)
    valid[0, 7:] = False
    m = block_diffusion_attention_mask(bs, valid=valid)[0]
    assert bool(m.any(dim=1).all())  # no empty row
    pads = torch.tensor([7, 8, 9, 17, 18, 19])
    real = torch.tensor([i for i in range(2 * L) if i not in pads.tolist()])
    assert not bool(m[real][:, pads].any()) and not bool(m[pads][:, real].any())


@pytest.mark.parametrize("bs", [1, 4, 5])
@pytest.mark.parametrize("packed", [False, True])
def test_mask_mod_equals_dense(bs, packed):
    from torch.nn.attention.flex_attention import create_mask

    if packed:
        doc, valid = random_layout(2, 29, seed=bs)
        mm = block_diffusion_mask_mod(bs, document_ids=doc, valid=valid)
        dense = block_diffusion_attention_mask(bs, document_ids=doc, valid=valid)
        B, L = doc.shape
    else:
        B, L = 1, 29
        mm = block_diffusion_mask_mod(bs, seq_len=L)
        dense = block_diffusion_attention_mask(bs, seq_len=L)
    got = create_mask(mm, B, 1, 2 * L, 2 * L, device="cpu")[:, 0]
    assert torch.equal(got, dense)


def _flex_vs_sdpa(device, dtype, L, bs, packed, tile, compiled=False):
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(L + bs)
    if packed:
        doc, valid = random_layout(2, L, seed=L)
        doc, valid = doc.to(device), valid.to(device)
        bm = block_diffusion_block_mask(bs, document_ids=doc, valid=valid, device=device, BLOCK_SIZE=tile,
                                        compile=compiled)  # fmt: skip
        dense = block_diffusion_attention_mask(bs, document_ids=doc, valid=valid)
        B = 2
    else:
        bm = block_diffusion_block_mask(bs, seq_len=L, device=device, BLOCK_SIZE=tile, compile=compiled)
        dense = block_diffusion_attention_mask(bs, seq_len=L, device=device)
        B = 1
    q, k, v = (torch.randn(B, 2, 2 * L, 16, generator=g).to(device, dtype) for _ in range(3))
    fa = torch.compile(flex_attention) if compiled else flex_attention
    out = fa(q, k, v, block_mask=bm)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense[:, None])
    base = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    err, base_err = (out.float() - ref).abs().max().item(), (base.float() - ref).abs().max().item()
    assert err <= 2 * base_err + (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("L,bs,packed", [(37, 4, False), (37, 5, True), (24, 1, True)])
def test_block_mask_attention_equals_dense_cpu(L, bs, packed):
    pytest.importorskip("torch.nn.attention.flex_attention")
    _flex_vs_sdpa("cpu", torch.float32, L, bs, packed, tile=16)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [37, 128, 1000])
@pytest.mark.parametrize("bs", [1, 4, 32])
@pytest.mark.parametrize("packed", [False, True])
def test_block_mask_attention_equals_dense_gpu(L, bs, packed):
    _flex_vs_sdpa("cuda", torch.bfloat16, L, bs, packed, tile=128, compiled=True)


@pytest.mark.gpu
def test_create_mask_equals_dense_gpu():
    from torch.nn.attention.flex_attention import create_mask

    doc, valid = random_layout(2, 300, seed=5)
    doc, valid = doc.cuda(), valid.cuda()
    mm = block_diffusion_mask_mod(32, document_ids=doc, valid=valid)
    got = create_mask(mm, 2, 1, 600, 600, device="cuda")[:, 0]
    assert torch.equal(got, block_diffusion_attention_mask(32, document_ids=doc, valid=valid))
