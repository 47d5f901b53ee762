"""The VSA plain-PyTorch reference against a slow, loop-per-query-tile implementation of DESIGN 6."""

import math
import textwrap

import pytest
import torch
from tessera.attention import (
    AttentionBackend,
    DenseAttention,
    VSAAttention,
    build_vsa_metadata,
    vsa_attention_reference,
    vsa_check_supported,
    vsa_select_blocks,
)


def _slow_tiles(grid, tile_size=(4, 4, 4)):
    """Raster token indices of each tile: tiles in raster order of tile coords, tokens raster inside."""
    (T, H, W), (a, b, c) = grid, tile_size
    return [
        [
            (t * H + h) * W + w
            for t in range(tt * a, min(T, tt * a + a))
            for h in range(th * b, min(H, th * b + b))
            for w in range(tw * c, min(W, tw * c + c))
        ]
        for tt in range(math.ceil(T / a))
        for th in range(math.ceil(H / b))
        for tw in range(math.ceil(W / c))
    ]


def _slow_vsa(q, k, v, gate, grid, topk):
    """Returns (out fp32, selected tiles per (b, n, query tile)); inputs in tile order, any float dtype."""
    sizes = [len(t) for t in _slow_tiles(grid)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    spans = [slice(s, s + n) for s, n in zip(starts, sizes, strict=True)]
    B, N, S, D = q.shape
    out = torch.zeros(B, N, S, D)
    chosen = {}
    for b in range(B):
        for n in range(N):
            # means accumulated in fp32, rounded to the activation dtype, then used in fp32
            qc, kc, vc = (
                torch.stack([x[b, n, sp].float().mean(0).to(x.dtype).float() for sp in spans])
                for x in (q, k, v)
            )
            for i, sp in enumerate(spans):
                scores = [float(qc[i] @ kc[j]) / math.sqrt(D) for j in range(len(spans))]
                keep = sorted(sorted(range(len(spans)), key=lambda j: (-scores[j], j))[:topk])
                chosen[b, n, i] = keep
                keys = torch.cat([torch.arange(starts[j], starts[j] + sizes[j]) for j in keep])
                att = q[b, n, sp].float() @ k[b, n, keys].float().T / math.sqrt(D)
                out[b, n, sp] = torch.softmax(att, -1) @ v[b, n, keys].float()
                if gate is not None:
                    coarse = torch.softmax(torch.tensor(scores), -1) @ vc
                    out[b, n, sp] += gate[b, n, sp].float() * coarse
    return out, chosen


def _inputs(shape, seed, dtype=torch.float32, count=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def _rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize(
    "grid, sparsity", [((5, 6, 7), 0.5), ((5, 6, 7), 0.0), ((4, 5, 9), 0.8), ((6, 4, 5), 0.7)]
)
@pytest.mark.parametrize("with_gate", [True, False])
def test_reference_matches_slow_loops(grid, sparsity, with_gate):
    m = build_vsa_metadata(grid, sparsity, "cpu")
    q, k, v, gate = _inputs((2, 3, m.total_seq_length, 16), seed=hash((grid, sparsity)) % 1000)
    gate = gate if with_gate else None
    out = vsa_attention_reference(q, k, v, gate, m)
    ref, chosen = _slow_vsa(q, k, v, gate, grid, m.topk)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert _rel_err(out, ref) < 1e-5

    block_index, coarse = vsa_select_blocks(q, k, v, m)
    assert block_index.dtype == torch.int32 and block_index.shape == (2, 3, m.num_tiles, m.topk)
    assert coarse.shape == (2, 3, m.num_tiles, 16)
    assert all(block_index[key].tolist() == keep for key, keep in chosen.items())


@pytest.mark.parametrize("gate_kind", ["none", "zeros"])
def test_sparsity_zero_equals_dense(gate_kind):
    grid = (5, 6, 7)
    m = build_vsa_metadata(grid, 0.0, "cpu")
    assert m.topk == m.num_tiles
    q, k, v = _inputs((2, 3, m.total_seq_length, 16), seed=7, count=3)  # raster order
    order = m.tile_partition_indices
    qt, kt, vt = (x[:, :, order] for x in (q, k, v))
    gate = None if gate_kind == "none" else torch.zeros_like(qt)
    out_tile = VSAAttention(m, impl="torch")(qt, kt, vt, gate)
    out = out_tile[:, :, m.reverse_tile_partition_indices]  # back to raster order
    assert _rel_err(out, DenseAttention()(q, k, v, None)) < 1e-5


def _nonzero_ints(shape, g):
    values = torch.randint(1, 4, shape, generator=g).float()
    return values * (torch.randint(0, 2, shape, generator=g) * 2 - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_scores_break_toward_lower_tile(dtype):
    grid = (5, 6, 7)  # 2 x 2 x 2 tiles, all partial except tile 0
    S, D = 5 * 6 * 7, 16
    g = torch.Generator().manual_seed(3)
    q, v = (torch.randn(1, 2, S, D, generator=g).to(dtype) for _ in range(2))
    # Small integers keep every tile sum, and so every tile mean, exact: all key tiles tie exactly.
    k = _nonzero_ints((1, 2, 1, D), g).to(dtype).expand(1, 2, S, D).contiguous()
    m = build_vsa_metadata(grid, 0.6, "cpu")  # keep ceil(0.4 * 8) = 4 of 8
    block_index, _ = vsa_select_blocks(q, k, v, m)
    assert torch.equal(block_index, torch.arange(4, dtype=torch.int32).expand(1, 2, 8, 4))

    # Two identical tiles (2 and 5) beat all others by far: with topk=1 the lower one (2) wins.
    q0 = _nonzero_ints((D,), g)
    q = q0.expand(1, 2, S, D).to(dtype).contiguous()
    k = (0.01 * torch.randn(1, 2, S, D, generator=g)).to(dtype)
    for t in (2, 5):
        k[:, :, m.token_tile_ids == t] = (3 * q0).to(dtype)
    m1 = build_vsa_metadata(grid, 0.875, "cpu")
    assert m1.topk == 1
    assert torch.equal(vsa_select_blocks(q, k, v, m1)[0], torch.full((1, 2, 8, 1), 2, dtype=torch.int32))


def test_bf16_rounds_tile_means_and_matches_slow():
    grid = (6, 5, 9)
    m = build_vsa_metadata(grid, 0.5, "cpu")
    q, k, v, gate = _inputs((2, 3, m.total_seq_length, 16), seed=11, dtype=torch.bfloat16)
    block_index, coarse = vsa_select_blocks(q, k, v, m)

    def means(x, rounded):
        sums = torch.zeros(2, 3, m.num_tiles, 16).index_add_(2, m.token_tile_ids, x.float())
        mean = sums / m.variable_block_sizes[:, None].float()
        return mean.bfloat16().float() if rounded else mean

    def coarse_from(rounded):
        qc, kc, vc = (means(x, rounded) for x in (q, k, v))
        return torch.softmax(qc @ kc.transpose(-1, -2) / 4.0, -1) @ vc

    assert coarse.dtype == torch.float32
    assert _rel_err(coarse, coarse_from(rounded=True)) < 1e-5
    assert _rel_err(coarse, coarse_from(rounded=False)) > 1e-4  # the rounding is really applied

    out = vsa_attention_reference(q, k, v, gate, m)
    ref, chosen = _slow_vsa(q, k, v, gate, grid, m.topk)
    assert out.dtype == torch.bfloat16
    assert all(block_index[key].tolist() == keep for key, keep in chosen.items())
    assert _rel_err(out, ref) < 1e-2


def test_backend_attributes_and_support_checks():
    m = build_vsa_metadata((5, 6, 7), 0.9, "cpu")
    backend = VSAAttention(m)
    assert isinstance(backend, AttentionBackend)
    assert backend.name == "vsa" and backend.uses_gate is True and backend.impl == "torch"
    with pytest.raises(ValueError, match="impl"):
        VSAAttention(m, impl="cuda")
    assert vsa_check_supported(torch.bfloat16, 128, "cpu") is None
    assert vsa_check_supported(torch.float32, 24, "cpu") is None
    assert "int8" in vsa_check_supported(torch.int8, 128, "cpu")
    assert "head dim" in vsa_check_supported(torch.bfloat16, 100, "cuda")
    assert vsa_check_supported(torch.bfloat16, 128, "meta") is not None


_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from tessera.attention import VSAAttention, build_vsa_metadata, vsa_attention_reference
    m = build_vsa_metadata((5, 6, 7), 0.6, "cpu")
    g = torch.Generator().manual_seed(5)
    q, k, v, gate = (torch.randn(1, 2, m.total_seq_length, 16, generator=g) for _ in range(4))
    for gt in (gate, None):
        out = VSAAttention(m, impl="triton")(q, k, v, gt)
        ref = vsa_attention_reference(q, k, v, gt, m)
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, err
    print("OK")
""")


@pytest.mark.slow
def test_triton_impl_matches_reference_under_interpreter(run_triton_interpreted):
    pytest.importorskip("triton")
    result = run_triton_interpreted("-c", _TRITON_SCRIPT)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("num_tiles", [1, 7, 64, 250])
def test_topk_matches_stable_sort_with_many_ties(num_tiles):
    """The threshold top-k equals a stable descending sort (ties to the lower index), also with heavy ties."""
    from tessera.attention.vsa import _topk_lower_index_wins

    gen = torch.Generator().manual_seed(num_tiles)
    scores = torch.randn(3, 5, num_tiles, num_tiles, generator=gen)
    scores[0] = scores[0].to(torch.bfloat16).to(torch.float32)  # bf16-rounded scores tie often
    scores[1] = torch.randint(-3, 4, scores[1].shape, generator=gen).float()  # few distinct values
    scores[2, 0] = 0.0
    scores[2, 0, :, ::2] = -0.0  # -0.0 == +0.0
    for topk in sorted({1, max(1, num_tiles // 3), num_tiles}):
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        expected = torch.sort(order[..., :topk], dim=-1).values.to(torch.int32)
        got = _topk_lower_index_wins(scores, topk)
        assert got.dtype == torch.int32 and got.is_contiguous()
        assert torch.equal(got, expected), f"topk={topk}"


def test_topk_with_nan_scores_still_selects_real_tiles():
    """NaN latents reach the selection before the loop's finite check: every slot must hold a real tile index (NaN
    ranks lowest), never uninitialised memory."""
    from tessera.attention.vsa import _topk_lower_index_wins

    scores = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1))
    scores[0] = float("nan")  # a whole NaN row: the lowest indices, as ties
    scores[1, :, ::2] = float("nan")  # NaN beside numbers: the numbers win
    got = _topk_lower_index_wins(scores, 5)
    assert got.dtype == torch.int32 and ((got >= 0) & (got < 40)).all()
    assert torch.equal(got[0], torch.arange(5, dtype=torch.int32).expand(7, 5))
    assert (got[1] % 2 == 1).all()
    assert torch.equal(got[2], _topk_lower_index_wins(scores[2:], 5)[0])
