"""SLA: the plain-PyTorch reference against a brute-force loop over blocks, metadata, validation, the backend.

The Triton kernels are tested in test_sla_triton.py (interpreted on CPU, and on a GPU).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tessera.attention import (
    MetadataCache,
    SLAAttention,
    build_sla_metadata,
    build_vsa_metadata,
    get_backend,
    sla_attention_reference,
    sla_check_supported,
    sla_num_selected,
    sla_select_blocks,
)
from tessera.attention.sla import sla_block_scores

CPU = torch.device("cpu")
_EPS = 1e-5


def _grid(seq_len: int) -> tuple[int, int, int]:
    return (1, 1, seq_len)  # SLA sees only S = T * H * W


def _phi(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "softmax":
        e = torch.exp(x - x.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)
    if feature_map == "elu":
        return torch.where(x > 0, x + 1, torch.exp(x))
    return x.clamp(min=0)


def brute_force_sla(q, k, v, block_q, block_k, num_selected, feature_map="softmax", weight=None, bias=None):
    """The spec, one (batch, head, query block) at a time with explicit masks over all S keys, in fp64.

    Returns (out fp64 [B, N, S, D], {(b, n, query block): selected key blocks ascending}, scores fp64 [B, N, Q, K]).
    """
    q, k, v = q.double(), k.double(), v.double()
    B, N, S, D = q.shape
    q_blocks = [range(s, min(s + block_q, S)) for s in range(0, S, block_q)]
    k_blocks = [range(s, min(s + block_k, S)) for s in range(0, S, block_k)]
    out = torch.zeros(B, N, S, D, dtype=torch.float64)
    chosen = {}
    all_scores = torch.zeros(B, N, len(q_blocks), len(k_blocks), dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            k_mean = sum(k[b, n, s] for s in range(S)) / S
            pooled_k = [sum(k[b, n, s] - k_mean for s in blk) / len(blk) for blk in k_blocks]
            for i, rows in enumerate(q_blocks):
                pooled_q = sum(q[b, n, s] for s in rows) / len(rows)
                scores = [float(pooled_q @ pk) for pk in pooled_k]
                all_scores[b, n, i] = torch.tensor(scores, dtype=torch.float64)
                keep = sorted(sorted(range(len(k_blocks)), key=lambda j: (-scores[j], j))[:num_selected])
                chosen[b, n, i] = keep
                allowed = torch.zeros(S, dtype=torch.bool)
                for j in keep:
                    allowed[list(k_blocks[j])] = True
                att = q[b, n, list(rows)] @ k[b, n].T / math.sqrt(D)
                out[b, n, list(rows)] = torch.softmax(att.masked_fill(~allowed, -math.inf), -1) @ v[b, n]
            if weight is not None:
                affinity = _phi(q[b, n], feature_map) @ _phi(k[b, n], feature_map).T  # [S, S]: phi(q_i) . phi(k_j)
                linear = (affinity @ v[b, n]) / (_EPS + affinity.sum(-1, keepdim=True))
                out[b, n] += linear @ weight.double().T + (0 if bias is None else bias.double())
    return out, chosen, all_scores


def _inputs(shape, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    # a shared key offset: subtracting the key mean shifts each score row by a constant (the selection stays), but
    # the scores themselves change
    k = k + torch.randn(shape[-1], generator=gen)
    weight = torch.randn(shape[-1], shape[-1], generator=gen) / math.sqrt(shape[-1])
    bias = torch.randn(shape[-1], generator=gen)
    return (*(x.to(dtype) for x in (q, k, v)), weight, bias)


# (S, block_q, block_k, topk): partial last query and key blocks; one selected block, some, all; block_q < block_k
_GEOMETRIES = [(333, 32, 16, 0.05), (333, 32, 16, 0.3), (333, 32, 16, 1.0), (150, 16, 64, 0.5)]


@pytest.mark.parametrize(("seq_len", "block_q", "block_k", "topk"), _GEOMETRIES)
@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_reference_matches_brute_force(seq_len, block_q, block_k, topk, feature_map) -> None:
    q, k, v, weight, bias = _inputs((1, 2, seq_len, 16), seed=seq_len + block_q)
    meta = build_sla_metadata(_grid(seq_len), CPU, sla_topk=topk, sla_block_q=block_q, sla_block_k=block_k,
                              sla_feature_map=feature_map)
    expected, chosen, scores = brute_force_sla(q, k, v, block_q, block_k, meta.num_selected, feature_map, weight, bias)
    torch.testing.assert_close(sla_block_scores(q, k, meta).double(), scores, rtol=1e-5, atol=1e-5)
    index = sla_select_blocks(q, k, meta)
    assert index.dtype == torch.int32 and index.shape == (1, 2, meta.num_q_blocks, meta.num_selected)
    assert {key: index[key].tolist() for key in chosen} == chosen
    got = sla_attention_reference(q, k, v, meta, proj_l_weight=weight, proj_l_bias=bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    if feature_map == "softmax":  # proj_l = 0, and a weight without bias
        sparse, _, _ = brute_force_sla(q, k, v, block_q, block_k, meta.num_selected)
        torch.testing.assert_close(sla_attention_reference(q, k, v, meta).double(), sparse, rtol=1e-5, atol=1e-5)
        no_bias, _, _ = brute_force_sla(q, k, v, block_q, block_k, meta.num_selected, feature_map, weight)
        got = sla_attention_reference(q, k, v, meta, proj_l_weight=weight)
        torch.testing.assert_close(got.double(), no_bias, rtol=1e-5, atol=1e-5)


def test_all_blocks_without_proj_l_is_dense_attention() -> None:
    q, k, v, _, _ = _inputs((2, 3, 333, 32), seed=1)
    meta = build_sla_metadata((3, 3, 37), CPU, sla_topk=1.0, sla_block_q=32, sla_block_k=16)
    torch.testing.assert_close(sla_attention_reference(q, k, v, meta), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)


def test_selection_ties_go_to_the_lower_block_and_nan_selects_real_blocks() -> None:
    meta = build_sla_metadata(_grid(128), CPU, sla_topk=0.25, sla_block_q=32, sla_block_k=16)  # 8 key blocks, J=2
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-2, 3, (1, 1, 128, 8), generator=gen).float()
    k = torch.randint(-2, 3, (1, 1, 128, 8), generator=gen).float()
    k[:, :, 16:64] = 3.0  # key blocks 1, 2, 3 tie at the top (for q > 0)
    k[:, :, 64:] = -k[:, :, :64]  # sequence mean exactly 0: every score is exact
    q[:, :, :32] = 1.0
    assert sla_select_blocks(q, k, meta)[0, 0, 0].tolist() == [1, 2]
    q[0, 0, 40] = float("nan")  # query block 1: a NaN row of scores
    k_nan = k.clone()
    k_nan[0, 0, 5] = float("nan")  # a NaN sequence mean: every score NaN
    for index in (sla_select_blocks(q, k, meta), sla_select_blocks(q, k_nan, meta)):
        assert ((index >= 0) & (index < meta.num_k_blocks)).all()
        assert (index[..., 1:] > index[..., :-1]).all()  # ascending, so distinct
    assert sla_select_blocks(q, k, meta)[0, 0, 1].tolist() == [0, 1]  # all NaN: ties, the lowest blocks


def test_metadata_and_num_selected() -> None:
    meta = build_sla_metadata((21, 30, 52), "cpu", sla_topk=0.1)  # Wan-1.3B 480p
    assert (meta.seq_len, meta.block_q, meta.block_k) == (32760, 128, 64)
    assert (meta.num_q_blocks, meta.num_k_blocks, meta.num_selected) == (256, 512, 51)
    assert meta.feature_map == "softmax" and meta.device == CPU and meta.topk == 0.1
    assert build_sla_metadata((21, 45, 80), "cpu", sla_topk=0.15).num_selected == 177  # 0.15 * 1182 = 177.3
    assert sla_num_selected(0.1, 30) == 3  # 3.0000000000000004
    assert sla_num_selected(0.29, 100) == 28  # 28.999999999999996: the float floor, as trained
    assert sla_num_selected(1e-9, 7) == 1 and sla_num_selected(1.0, 7) == 7 and sla_num_selected(0.5, 7) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.topk = 0.2


@pytest.mark.parametrize(
    ("options", "error", "needle"),
    [
        ({"sla_topk": 0}, ValueError, "attention.sla_topk"),
        ({"sla_topk": 1.5}, ValueError, "attention.sla_topk"),
        ({"sla_topk": float("nan")}, ValueError, "attention.sla_topk"),
        ({"sla_topk": "0.1"}, TypeError, "attention.sla_topk"),
        ({"sla_topk": 0.1, "sla_block_q": 48}, ValueError, "attention.sla_block_q"),
        ({"sla_topk": 0.1, "sla_block_k": 48}, ValueError, "attention.sla_block_k"),
        ({"sla_topk": 0.1, "sla_block_k": 0}, ValueError, "attention.sla_block_k"),
        ({"sla_topk": 0.1, "sla_block_q": True}, ValueError, "attention.sla_block_q"),
        ({"sla_topk": 0.1, "sla_feature_map": "gelu"}, ValueError, "attention.sla_feature_map"),
    ],
)
def test_config_errors_name_the_key(options, error, needle) -> None:
    with pytest.raises(error, match=needle) as info:
        build_sla_metadata((3, 4, 5), "cpu", **options)
    assert "use" in str(info.value)  # and say the fix


def test_the_registered_backend_and_its_metadata_options() -> None:
    backend = get_backend("sla")
    assert backend.sparse and not backend.uses_gate and not backend.takes_sparsity
    assert backend.config_keys == ("sla_topk", "sla_block_q", "sla_block_k", "sla_feature_map")
    assert "proj_l" in backend.auto_problem(CPU) and "proj_l" in backend.auto_problem(torch.device("cuda"))
    assert backend.check_supported(torch.float32, 40, CPU, (2, 3, 5)) is None  # the reference runs anything
    assert "head dims" in backend.check_supported(torch.bfloat16, 96, torch.device("cuda"), (2, 3, 5))
    assert "float16" in sla_check_supported(torch.int8, 64, "cpu")

    cache = MetadataCache()
    options = {"sla_topk": 0.1, "sla_block_k": 32}
    meta = cache.get(backend, (4, 8, 8), 0.9, CPU, options)
    assert (meta.seq_len, meta.block_k, meta.num_selected) == (256, 32, 1)  # floor(0.1 * 8) = 0 -> 1
    assert cache.get(backend, (4, 8, 8), 0.5, CPU, dict(reversed(options.items()))) is meta  # sparsity ignored
    assert cache.get(backend, (4, 8, 8), None, CPU, {"sla_topk": 0.5, "sla_block_k": 32}) is not meta
    assert backend.token_order(meta) is None  # raster order
    with pytest.raises(TypeError, match="sla_topk"):
        cache.get(get_backend("vsa"), (4, 8, 8), 0.5, CPU, options)  # VSA takes no options
    vsa_meta = cache.get(get_backend("vsa"), (4, 8, 8), 0.5, CPU)  # the runtime's 4 positional arguments
    assert vsa_meta.topk == build_vsa_metadata((4, 8, 8), 0.5, CPU).topk and len(cache) == 3
    attn = backend.build(meta, None, 32)
    assert isinstance(attn, SLAAttention) and attn.kernel == "reference"
    # per-layer binding: a block's self-attention module with a proj_l, and one without (proj_l = 0)
    module = torch.nn.Module()
    module.proj_l = torch.nn.Linear(32, 32)
    bound = backend.bind_layer(attn, module)
    assert bound is not attn and bound.metadata is meta
    assert bound.proj_l_weight.data_ptr() == module.proj_l.weight.data_ptr()  # referenced, not copied
    module.proj_l = None
    assert backend.bind_layer(attn, module).proj_l_weight is None and get_backend("vsa").bind_layer is None
    assert backend.layer_weight == "proj_l" and get_backend("vsa").layer_weight is None


def test_attention_object_binds_proj_l_per_layer() -> None:
    q, k, v, weight, bias = _inputs((1, 3, 333, 16), seed=3)
    meta = build_sla_metadata((3, 3, 37), CPU, sla_topk=0.3, sla_block_q=32, sla_block_k=16, sla_feature_map="elu")
    attn = SLAAttention(meta, head_dim=16)
    assert attn.kernel == "reference" and attn.feature_map == "elu" and "proj_l=zero" in repr(attn)
    bound = attn.for_layer(weight, bias)
    assert bound.metadata is meta and bound.kernel == attn.kernel and attn.proj_l_weight is None
    expected = sla_attention_reference(q, k, v, meta, proj_l_weight=weight, proj_l_bias=bias)
    assert (expected - sla_attention_reference(q, k, v, meta, feature_map="softmax", proj_l_weight=weight,
                                               proj_l_bias=bias)).abs().max() > 1e-3  # elu came from the metadata
    torch.testing.assert_close(bound(q, k, v), expected, rtol=0, atol=0)
    torch.testing.assert_close(attn(q, k, v, None), sla_attention_reference(q, k, v, meta), rtol=0, atol=0)
    # Ulysses' receive buffer [S, 3, B, N, D] read through strided views, the output into its send buffer
    recv = torch.stack([x.permute(2, 0, 1, 3) for x in (q, k, v)], dim=1).contiguous()
    send = torch.full((333, 1, 3, 16), float("nan"))
    got = bound(*(recv[:, i].permute(1, 2, 0, 3) for i in range(3)), None, out_BNSD=send.permute(1, 2, 0, 3))
    assert got.data_ptr() == send.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    half = bound(*(x.to(torch.bfloat16) for x in (q, k, v)))
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uses_gate=False"):
        bound(q, k, v, q)
    with pytest.raises(ValueError, match="Linear\\(D, D\\)"):
        attn.for_layer(torch.zeros(16, 8), None)
    with pytest.raises(ValueError, match="without proj_l_weight"):
        attn.for_layer(None, bias)
    with pytest.raises(ValueError, match="impl must be"):
        SLAAttention(meta, impl="torch")
    with pytest.raises(ValueError, match="head dims"):
        SLAAttention(meta, impl="triton", head_dim=96)
    with pytest.raises(ValueError, match="SLAAttention feature_map"):
        SLAAttention(meta, feature_map="tanh")
