"""SLA Triton kernels against the plain-PyTorch reference (itself checked against brute force in test_sla.py).

CPU checks run the kernels under TRITON_INTERPRET=1 in a subprocess (this file run as a script), because another test
module may already have imported triton in this pytest process without the interpreter. GPU checks (marker ``gpu``)
run the compiled kernels at the Wan-1.3B 480p shape.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

# (S, block_q, block_k, topk, feature map, with proj_l): partial last query and key blocks; one selected block, all,
# some; block_q < 16 (masked rows in a 16-row tile); 128-key blocks (two 64-key steps; the last block, 52 real tokens,
# is in every selection and its second step lies wholly past S); block_q > 128 (two programs share one query block).
# Small shapes: the interpreter runs ~10 ms per key step.
_CASES = [
    (333, 32, 16, 0.05, "softmax", True),
    (150, 32, 16, 1.0, "elu", True),
    (333, 32, 16, 0.3, "relu", False),
    (180, 8, 128, 1.0, "softmax", True),
    (300, 256, 16, 0.2, "softmax", True),
]


def _inputs(shape, gen: torch.Generator):
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    k = k + torch.randn(shape[-1], generator=gen)  # a shared key offset: the key mean is not 0
    q[:, -1] *= 4.0  # the last head: large logits, so the running max is rescaled often
    weight = torch.randn(shape[-1], shape[-1], generator=gen) / math.sqrt(shape[-1])
    bias = torch.randn(shape[-1], generator=gen)
    return q, k, v, weight, bias


def _expected(q, k, v, meta, block_index, weight, bias) -> torch.Tensor:
    """fp32 reference output for a given selection (the reference's own selection is checked separately)."""
    from tessera.attention.sla import _sparse_part, sla_linear_reference

    out = _sparse_part(q, k, v, block_index, meta)
    if weight is not None:
        out = out + F.linear(sla_linear_reference(q, k, v, meta.feature_map), weight.float(), bias.float())
    return out


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def _check_sparse() -> None:
    """The sparse kernel (linear branch and proj_l in its epilogue) on the reference's selection: every geometry in
    fp32 (D = 16), the first two in bf16 (D = 32)."""
    gen = torch.Generator().manual_seed(0)
    for dtype, cases in ((torch.float32, _CASES), (torch.bfloat16, _CASES[:2])):
        _check_sparse_cases(dtype, cases, gen)


def _check_sparse_cases(dtype: torch.dtype, cases: list, gen: torch.Generator) -> None:
    from tessera.attention.sla import build_sla_metadata, sla_select_blocks
    from tessera.attention.sla_triton import sla_sparse_attention

    head_dim = 16 if dtype == torch.float32 else 32
    bound = 1e-5 if dtype == torch.float32 else 1e-2  # 16-bit: P and the output rounded to bf16
    for seq_len, block_q, block_k, topk, feature_map, with_proj in cases:
        meta = build_sla_metadata((1, 1, seq_len), "cpu", sla_topk=topk, sla_block_q=block_q, sla_block_k=block_k,
                                  sla_feature_map=feature_map)
        q, k, v, weight, bias = _inputs((1, 2, seq_len, head_dim), gen)
        q, k, v = (x.to(dtype) for x in (q, k, v))
        weight, bias = (weight, bias) if with_proj else (None, None)
        block_index = sla_select_blocks(q, k, meta)
        got = sla_sparse_attention(q, k, v, block_index, block_q, block_k, feature_map=feature_map,
                                   proj_l_weight=weight, proj_l_bias=bias)
        assert got.dtype == dtype and got.shape == q.shape
        err = _rel_err(got, _expected(q, k, v, meta, block_index, weight, bias))
        assert err < bound, f"{dtype} S={seq_len} {block_q}x{block_k} J={meta.num_selected} {feature_map}: {err:.2e}"
        print(f"{dtype} S={seq_len} {block_q}x{block_k} J={meta.num_selected} {feature_map}: {err:.1e}")


def _check_layouts() -> None:
    """Ulysses' receive buffer [S, 3, B, N, D] read in place, k with other strides than q, the output written into a
    [S, B, N, D] send buffer or over q; a bf16 proj_l; the linear state against fp64."""
    from tessera.attention.sla import build_sla_metadata, sla_feature, sla_select_blocks
    from tessera.attention.sla_triton import sla_linear_state, sla_sparse_attention

    gen = torch.Generator().manual_seed(1)
    meta = build_sla_metadata((3, 3, 37), "cpu", sla_topk=0.3, sla_block_q=32, sla_block_k=16)
    q, k, v, weight, bias = _inputs((1, 2, 333, 16), gen)
    recv = torch.stack([x.permute(2, 0, 1, 3) for x in (q, k, v)], dim=1).contiguous()
    tq, tk, tv = (recv[:, i].permute(1, 2, 0, 3) for i in range(3))
    block_index = sla_select_blocks(q, k, meta)
    expected = _expected(q, k, v, meta, block_index, weight, bias)
    send = torch.full((333, 1, 2, 16), float("nan"))
    got = sla_sparse_attention(tq, k, tv, block_index, 32, 16, proj_l_weight=weight, proj_l_bias=bias,
                               out_BNSD=send.permute(1, 2, 0, 3))
    assert got.data_ptr() == send.data_ptr()
    assert _rel_err(got, expected) < 1e-5, _rel_err(got, expected)
    into_q = q.clone()
    got = sla_sparse_attention(into_q, k, v, block_index, 32, 16, proj_l_weight=weight, proj_l_bias=bias,
                               out_BNSD=into_q)
    assert _rel_err(got, expected) < 1e-5
    half_weight, half_bias = weight.to(torch.bfloat16), bias.to(torch.bfloat16)  # read in its dtype, used in fp32
    got = sla_sparse_attention(q, k, v, block_index, 32, 16, proj_l_weight=half_weight, proj_l_bias=half_bias)
    assert _rel_err(got, _expected(q, k, v, meta, block_index, half_weight, half_bias)) < 1e-5
    for feature_map in ("softmax", "elu", "relu"):
        kv, ksum = sla_linear_state(tk, tv, feature_map)
        phi_k = sla_feature(k.double(), feature_map)
        torch.testing.assert_close(kv.double(), phi_k.transpose(-1, -2) @ v.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ksum.double(), phi_k.sum(2), rtol=1e-5, atol=1e-5)


def _check_select() -> None:
    """Block scores equal the spec's up to summation order; the top-k equals the spec's exactly (ties to the lower
    block); the whole selection equals the spec on exactly representable inputs with ties; NaN selects real blocks."""
    from tessera.attention.sla import build_sla_metadata, sla_block_scores, sla_select_blocks, sla_topk_reference
    from tessera.attention.sla_triton import sla_pooled_scores, sla_topk_blocks

    gen = torch.Generator().manual_seed(2)
    for seq_len, block_q, block_k, dtype in ((333, 32, 16, torch.float32), (200, 8, 128, torch.bfloat16),
                                             (300, 256, 16, torch.float32)):
        meta = build_sla_metadata((1, 1, seq_len), "cpu", sla_topk=0.3, sla_block_q=block_q, sla_block_k=block_k)
        q, k, _, _, _ = _inputs((1, 2, seq_len, 32), gen)
        q, k = q.to(dtype), k.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # a BSND k
        torch.testing.assert_close(sla_pooled_scores(q, k, block_q, block_k), sla_block_scores(q, k, meta),
                                   rtol=1e-5, atol=1e-5)
    scores = torch.randint(-3, 4, (1, 2, 11, 21), generator=gen).float()  # heavy ties
    scores[0, 0, 0, ::2] = -0.0  # -0.0 == +0.0: a tie too
    scores[0, 0, 0, 1::2] = 0.0
    for num_selected in (1, 5, 21):
        assert torch.equal(sla_topk_blocks(scores, num_selected), sla_topk_reference(scores, num_selected))

    meta = build_sla_metadata((1, 1, 384), "cpu", sla_topk=0.25, sla_block_q=32, sla_block_k=16)  # J = 6 of 24
    q = torch.randint(-2, 3, (2, 1, 384, 16), generator=gen).float()
    k = torch.randint(-2, 3, (2, 1, 384, 16), generator=gen).float()
    k[:, :, 48:96] = k[:, :, 16:32].repeat(1, 1, 3, 1)  # key blocks 1, 3, 4, 5 equal: exact ties
    k[:, :, 192:] = -k[:, :, :192]  # sequence mean exactly 0: every mean and score is exact in fp32
    got = sla_topk_blocks(sla_pooled_scores(q, k, 32, 16), meta.num_selected)
    assert torch.equal(got, sla_select_blocks(q, k, meta))
    q[0, 0, 40] = float("nan")  # query block 1 of (0, 0): a NaN score row
    k[1, 0, 7] = float("nan")  # (1, 0): a NaN sequence mean, every score NaN
    got = sla_topk_blocks(sla_pooled_scores(q, k, 32, 16), meta.num_selected)
    assert ((got >= 0) & (got < meta.num_k_blocks)).all() and (got[..., 1:] > got[..., :-1]).all()
    assert got[0, 0, 1].tolist() == list(range(6)) and got[1, 0].tolist() == [list(range(6))] * 12


def _check_backend() -> None:
    """SLAAttention(impl="triton"), unbound and bound to a proj_l, against the reference, fp32 and bf16."""
    from tessera.attention import SLAAttention, build_sla_metadata, sla_attention_reference, sla_select_blocks
    from tessera.attention.sla_triton import sla_pooled_scores, sla_topk_blocks

    gen = torch.Generator().manual_seed(3)
    meta = build_sla_metadata((3, 3, 37), "cpu", sla_topk=0.2, sla_block_q=32, sla_block_k=16, sla_feature_map="elu")
    attn = SLAAttention(meta, impl="triton", head_dim=32)
    assert attn.kernel == "triton"
    q, k, v, weight, bias = _inputs((1, 2, 333, 32), gen)
    # random inputs: no score lies within fp32 summation error of the J-th, so the selections agree
    assert torch.equal(sla_topk_blocks(sla_pooled_scores(q, k, 32, 16), meta.num_selected),
                       sla_select_blocks(q, k, meta))
    for dtype, bound, layers in ((torch.float32, 1e-5, (attn, attn.for_layer(weight, bias))),
                                 (torch.bfloat16, 1e-2, (attn.for_layer(weight.to(torch.bfloat16), None),))):
        x = [t.to(dtype) for t in (q, k, v)]
        for layer in layers:
            got = layer(*x)
            expected = sla_attention_reference(*[t.float() for t in x], meta, proj_l_weight=layer.proj_l_weight,
                                               proj_l_bias=layer.proj_l_bias)
            assert got.dtype == dtype and _rel_err(got, expected) < bound, (dtype, _rel_err(got, expected))


# Three processes (each pays ~2.5 s of imports): ~40 s in all on a 2-core CPU.
_CHECKS = {"sparse": (_check_sparse,), "layouts": (_check_layouts,), "select": (_check_select, _check_backend)}


@pytest.mark.parametrize("checks", list(_CHECKS))
def test_interpreted_kernels_match_reference(run_triton_interpreted, checks: str) -> None:
    proc = run_triton_interpreted(__file__, checks)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "heads", "bound"), [(torch.bfloat16, 12, 1e-2), (torch.float32, 2, 1e-5)])
def test_gpu_sla_matches_reference_at_wan13b(dtype: torch.dtype, heads: int, bound: float) -> None:
    """The Wan-1.3B 480p shape (grid 21x30x52, S = 32,760, D = 128, top-k 0.1): the Triton selection agrees with the
    spec (up to rare fp32 summation-order flips), and the full call equals the reference on the kernel's selection."""
    from tessera.attention import SLAAttention, build_sla_metadata, sla_select_blocks
    from tessera.attention.sla_triton import sla_pooled_scores, sla_topk_blocks

    meta = build_sla_metadata((21, 30, 52), "cuda", sla_topk=0.1)
    gen = torch.Generator().manual_seed(5)
    q, k, v, weight, bias = (t.to(dtype).cuda() for t in _inputs((1, heads, meta.seq_len, 128), gen))
    block_index = sla_topk_blocks(sla_pooled_scores(q, k, 128, 64), meta.num_selected)
    spec_index = sla_select_blocks(q, k, meta)
    assert (block_index == spec_index).all(-1).float().mean().item() > 0.99
    attn = SLAAttention(meta, dtype=dtype, head_dim=128).for_layer(weight, bias)
    assert attn.kernel == "triton"
    got = attn(q, k, v)
    expected = _expected(q, k, v, meta, block_index, weight, bias)
    assert got.dtype == dtype and _rel_err(got, expected) < bound, _rel_err(got, expected)
    sparse_only = SLAAttention(meta)(q, k, v)
    expected = _expected(q, k, v, meta, block_index, None, None)
    assert _rel_err(sparse_only, expected) < bound, _rel_err(sparse_only, expected)


@pytest.mark.gpu
@pytest.mark.parametrize(("block_q", "block_k", "head_dim"), [(128, 64, 128), (64, 32, 64), (256, 128, 128),
                                                               (8, 16, 64)])
def test_gpu_layouts_and_block_geometries(block_q: int, block_k: int, head_dim: int) -> None:
    """Ulysses' receive buffer [S, 3, B, N, D] read in place and the output written into its send buffer, on a grid
    with partial last blocks; other block sizes (two programs per query block, two steps per key block)."""
    from tessera.attention import SLAAttention, build_sla_metadata, sla_select_blocks
    from tessera.attention.sla_triton import sla_pooled_scores, sla_topk_blocks

    meta = build_sla_metadata((5, 17, 23), "cuda", sla_topk=0.15, sla_block_q=block_q, sla_block_k=block_k)
    gen = torch.Generator().manual_seed(6)
    q, k, v, weight, bias = _inputs((2, 3, meta.seq_len, head_dim), gen)
    recv = torch.stack([x.permute(2, 0, 1, 3) for x in (q, k, v)], dim=1).to(torch.bfloat16).cuda()
    views = [recv[:, i].permute(1, 2, 0, 3) for i in range(3)]
    send = torch.full((meta.seq_len, 2, 3, head_dim), float("nan"), dtype=torch.bfloat16, device="cuda")
    attn = SLAAttention(meta, head_dim=head_dim).for_layer(weight.cuda(), bias.cuda())
    got = attn(*views, None, out_BNSD=send.permute(1, 2, 0, 3))
    assert got.data_ptr() == send.data_ptr()
    block_index = sla_topk_blocks(sla_pooled_scores(*views[:2], block_q, block_k), meta.num_selected)
    assert (block_index == sla_select_blocks(*views[:2], meta)).all(-1).float().mean().item() > 0.99
    expected = _expected(*views, meta, block_index, weight.cuda(), bias.cuda())
    assert _rel_err(got, expected) < 1e-2, _rel_err(got, expected)


if __name__ == "__main__":  # run by the interpreted tests above, under TRITON_INTERPRET=1
    for check in _CHECKS[sys.argv[1]]:
        check()
    print("ok")
