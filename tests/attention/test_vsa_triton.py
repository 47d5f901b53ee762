"""VSA fine Triton kernel vs a slow fp32 reference (loop over query tiles).

CPU checks run the kernel under TRITON_INTERPRET=1 in a subprocess (this file run as a script), because
another test module may already have imported triton in this pytest process without the interpreter.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

_TILE_SIZES = (64, 64, 37, 12, 64, 5)  # partial tiles in the middle and at the end


def _tile_offsets(tile_sizes: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(tile_sizes).cumsum(0).tolist()], dtype=torch.int32)


def _random_block_index(batch: int, heads: int, num_tiles: int, topk: int, gen: torch.Generator):
    scores = torch.rand(batch, heads, num_tiles, num_tiles, generator=gen)
    return scores.topk(topk, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


def reference_vsa_fine(q, k, v, tile_offsets, block_index, coarse=None, gate=None) -> torch.Tensor:
    """Obvious fp32 reference: for each (b, n, query tile) gather the selected tiles' real keys."""
    q, k, v = q.float(), k.float(), v.float()
    batch, heads, _, head_dim = q.shape
    offsets = tile_offsets.tolist()
    out = torch.zeros_like(q)
    for b in range(batch):
        for n in range(heads):
            for t in range(len(offsets) - 1):
                rows = slice(offsets[t], offsets[t + 1])
                selected = block_index[b, n, t].tolist()
                keys = torch.cat([torch.arange(offsets[s], offsets[s + 1]) for s in selected])
                scores = q[b, n, rows] @ k[b, n, keys].T / math.sqrt(head_dim)
                out[b, n, rows] = scores.softmax(-1) @ v[b, n, keys]
                if gate is not None and coarse is not None:
                    out[b, n, rows] += gate[b, n, rows].float() * coarse[b, n, t].float()
    return out


def _check_case(dtype: torch.dtype, head_dim: int, seed: int) -> None:
    from tessera.attention.vsa_triton import vsa_fine_attention

    gen = torch.Generator().manual_seed(seed)
    batch, heads = 2, 3
    offsets = _tile_offsets(_TILE_SIZES)
    num_tiles, seq_len = len(_TILE_SIZES), int(offsets[-1])
    q, k, v, gate = (torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(4))
    # head 1: logits growing along the sequence by far more than 2**8 between tiles, so the running max
    # must be rescaled (not only lag behind); head 2 keeps unit-scale logits
    q[:, 1] *= 4.0
    k[:, 1] *= torch.linspace(0.5, 6.0, seq_len)[:, None]
    coarse = torch.randn(batch, heads, num_tiles, head_dim, generator=gen)
    bound = 1e-4 if dtype == torch.float32 else 2e-2  # half inputs: rounding of q, k, v and p
    # every topk once in fp32 D=16; the other cases keep the interpreter time down (CI has 2 cores)
    topks = range(1, num_tiles + 1) if (dtype, head_dim) == (torch.float32, 16) else (1, 4, num_tiles)
    for topk in topks:
        block_index = _random_block_index(batch, heads, num_tiles, topk, gen)
        for with_gate in (False, True):
            g, c = (gate, coarse) if with_gate else (None, None)
            cast = [t.to(dtype) for t in (q, k, v)]
            g_cast = None if g is None else g.to(dtype)
            got = vsa_fine_attention(*cast, offsets, block_index, c, g_cast)
            assert got.dtype == dtype and got.shape == q.shape
            # reference on the rounded inputs isolates kernel error from input rounding
            expected = reference_vsa_fine(*cast, offsets, block_index, c, g_cast)
            err = (got.float() - expected).norm() / expected.norm()
            assert err < bound, f"{dtype} D={head_dim} topk={topk} gate={with_gate}: rel err {err:.2e}"
            starts, ends = offsets[block_index.long()], offsets[block_index.long() + 1]
            spans = ((starts << 7) | (ends - starts)).to(torch.int32)
            from_spans = vsa_fine_attention(*cast, offsets, block_index, c, g_cast, key_spans=spans)
            torch.testing.assert_close(from_spans, got, rtol=0, atol=0)  # the same math, other lookups


def _check_layouts_and_means() -> None:
    """[B, S, N, D] tensors viewed as BNSD are read in place and the output keeps that layout; the Triton
    tile means equal the torch spec (fp32 accumulation, rounded to the input dtype) on partial tiles."""
    from tessera.attention.vsa import _tile_means, build_vsa_metadata
    from tessera.attention.vsa_coarse_triton import vsa_tile_means
    from tessera.attention.vsa_triton import vsa_fine_attention

    gen = torch.Generator().manual_seed(11)
    metadata = build_vsa_metadata((5, 6, 7), 0.5, "cpu")  # partial tiles on every axis
    batch, heads, head_dim, seq_len = 2, 3, 16, metadata.total_seq_length
    q, k, v, gate = (torch.randn(batch, seq_len, heads, head_dim, generator=gen).transpose(1, 2) for _ in range(4))
    coarse = torch.randn(batch, heads, metadata.num_tiles, head_dim, generator=gen)
    block_index = _random_block_index(batch, heads, metadata.num_tiles, metadata.topk, gen)
    strided = vsa_fine_attention(q, k, v, metadata.tile_offsets, block_index, coarse, gate)
    assert strided.stride() == q.stride(), (strided.stride(), q.stride())
    expected = reference_vsa_fine(q, k, v, metadata.tile_offsets, block_index, coarse, gate)
    err = (strided - expected).norm() / expected.norm()
    assert err < 1e-4, f"strided layout: rel err {err:.2e}"
    # Ulysses' receive buffer [S, 4, B, N, D] read in place, the output written into a [S, B, N, D] send buffer
    recv = torch.stack([x.permute(2, 0, 1, 3) for x in (q, k, v, gate)], dim=1).contiguous()
    tq, tk, tv, tg = (recv[:, i].permute(1, 2, 0, 3) for i in range(4))
    send = torch.full((seq_len, batch, heads, head_dim), float("nan"))
    token_major = vsa_fine_attention(tq, tk, tv, metadata.tile_offsets, block_index, coarse, tg,
                                     out_BNSD=send.permute(1, 2, 0, 3))
    assert token_major.data_ptr() == send.data_ptr()
    torch.testing.assert_close(send.permute(1, 2, 0, 3), strided, rtol=0, atol=0)
    q_buffer = q.clone()  # out may alias q: every program reads its query rows before writing them
    in_place = vsa_fine_attention(q_buffer, k, v, metadata.tile_offsets, block_index, coarse, gate, out_BNSD=q_buffer)
    assert in_place.data_ptr() == q_buffer.data_ptr()
    torch.testing.assert_close(in_place, strided, rtol=0, atol=0)
    for dtype in (torch.float32, torch.bfloat16):
        xs = (q.to(dtype), k.to(dtype), v.contiguous().to(dtype))  # v: other strides -> copied, still right
        for count, heads_per_program in ((1, 1), (3, 1), (3, 2), (3, 4)):  # 3 heads: a partial head group too
            got = vsa_tile_means(xs[:count], metadata.tile_offsets, metadata.num_tiles,
                                 heads_per_program=heads_per_program)
            assert got.dtype == dtype and got.shape == (count, *q.shape[:2], metadata.num_tiles, head_dim)
            for x, mean in zip(xs[:count], got, strict=True):
                spec = _tile_means(x, metadata)
                # Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): one bf16 ulp there.
                rtol = 1e-6 if dtype == torch.float32 else 2.0**-7
                torch.testing.assert_close(mean.float(), spec.float(), rtol=rtol, atol=1e-6)


def _tied_scores(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """fp32 scores with heavy ties: bf16-rounded, few distinct integers, and -0.0 next to +0.0."""
    scores = torch.randn(3, *shape, generator=gen)
    scores[0] = scores[0].to(torch.bfloat16).float()
    scores[1] = torch.randint(-3, 4, shape, generator=gen).float()
    scores[2, ..., ::2] = 0.0
    scores[2, ..., 1::4] = -0.0
    return scores


def _check_select() -> None:
    """The Triton top-k equals the torch spec exactly (ties to the lower index), and the Triton coarse
    stage equals select_from_tile_means on means whose dot products are exact in any summation order."""
    from tessera.attention.vsa import _topk_lower_index_wins, select_from_tile_means
    from tessera.attention.vsa_coarse_triton import vsa_select_from_means, vsa_topk_lower_index_wins

    gen = torch.Generator().manual_seed(3)
    # (rows, cols): widths that are not powers of two, up to several warps per row on GPUs
    for rows, cols in ((7, 7), (5, 300), (2, 2500)):
        scores = _tied_scores((2, rows, cols), gen)
        for topk in sorted({1, max(1, cols // 10), cols - 1, cols}):
            spec = _topk_lower_index_wins(scores, topk)
            # several rows per program (a partial last group of rows too), two key bits per counting pass, and the
            # search stopped once a row's count is exactly topk
            configs = ({}, {"ROWS": 2}, {"EARLY_EXIT": False}, {"ROWS": 4, "RADIX_BITS": 2, "EARLY_EXIT": True})
            for config in configs[:1] if cols > 1024 else configs:
                got = vsa_topk_lower_index_wins(scores, topk, config=config)
                assert got.dtype == torch.int32 and got.shape == (3, 2, rows, topk)
                assert torch.equal(got, spec), f"{rows}x{cols} topk={topk} {config}"

    # several query and key blocks; partial last blocks; topk == T
    cases = ((9, 16, 3, torch.float32), (9, 16, 3, torch.bfloat16), (40, 32, 7, torch.bfloat16),
             (67, 16, 67, torch.float32))
    for num_tiles, head_dim, topk, dtype in cases:
        # small integers: every dot product and partial sum is exact, so the scores equal the spec's bit for
        # bit and the selection must match exactly, ties included
        q_c, k_c = (torch.randint(-2, 3, (2, 3, num_tiles, head_dim), generator=gen).float() for _ in range(2))
        k_c[:, :, 5:9] = k_c[:, :, 1:2]  # duplicate key tiles: exact ties
        v_c = torch.randn(2, 3, num_tiles, head_dim, generator=gen)
        means = [x.to(dtype) for x in (q_c, k_c, v_c)]
        sizes = torch.randint(1, 65, (num_tiles,), generator=gen)
        sizes[torch.rand(num_tiles, generator=gen) < 0.5] = 64  # whole tiles among the partial ones
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(torch.int32)
        block_index, coarse, spans = vsa_select_from_means(*means, topk, offsets)
        spec_index, spec_coarse = select_from_tile_means(*means, topk)
        for splits in (4,):  # key tiles split over programs, then combined (T = 9 and 40: some splits hold none)
            split_index, split_coarse, _ = vsa_select_from_means(*means, topk, config=dict(SPLITS=splits, BLOCK_Q=16,
                                                                                           BLOCK_K=16))
            assert torch.equal(split_index, spec_index), f"T={num_tiles} splits={splits}"
            torch.testing.assert_close(split_coarse, spec_coarse, rtol=1e-5, atol=1e-6)
        assert torch.equal(block_index, spec_index), f"T={num_tiles} {dtype}"
        starts, ends = offsets[spec_index.long()], offsets[spec_index.long() + 1]
        whole_first = torch.sort(((ends - starts) != 64).int(), dim=-1, stable=True).indices
        expected = ((starts << 7) | (ends - starts)).gather(-1, whole_first)
        assert torch.equal(spans, expected), "packed key spans: whole tiles first, each group ascending"
        assert vsa_select_from_means(*means, topk)[2] is None
        assert coarse.dtype == torch.float32
        torch.testing.assert_close(coarse, spec_coarse, rtol=1e-5, atol=1e-6)


def _run_interpreted(run_triton_interpreted, dtype_name: str, head_dim: int) -> None:
    proc = run_triton_interpreted(__file__, dtype_name, str(head_dim))
    assert proc.returncode == 0, proc.stdout + proc.stderr


_INTERPRETED_CASES = [("float32", 16), ("float32", 32), ("bfloat16", 32), ("float16", 16)]  # (dtype, D)


@pytest.mark.parametrize(("dtype_name", "head_dim"), _INTERPRETED_CASES)
def test_interpreted_kernel_matches_reference(run_triton_interpreted, dtype_name: str, head_dim: int) -> None:
    _run_interpreted(run_triton_interpreted, dtype_name, head_dim)


def test_interpreted_strided_layout_and_tile_means(run_triton_interpreted) -> None:
    _run_interpreted(run_triton_interpreted, "layout", 0)


def test_interpreted_topk_and_coarse_stage(run_triton_interpreted) -> None:
    _run_interpreted(run_triton_interpreted, "select", 0)


def test_reference_equals_dense_at_full_selection() -> None:
    """Sanity of the reference itself: all tiles selected == dense softmax attention."""
    gen = torch.Generator().manual_seed(0)
    offsets = _tile_offsets(_TILE_SIZES)
    seq_len, num_tiles = int(offsets[-1]), len(_TILE_SIZES)
    q, k, v = (torch.randn(1, 2, seq_len, 16, generator=gen) for _ in range(3))
    block_index = torch.arange(num_tiles, dtype=torch.int32).expand(1, 2, num_tiles, num_tiles)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(reference_vsa_fine(q, k, v, offsets, block_index), dense, rtol=1e-5, atol=1e-5)


def test_coarse_stage_rejects_mismatched_inputs() -> None:
    from tessera.attention.vsa_coarse_triton import vsa_select_from_means

    means = torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match="share one"):
        vsa_select_from_means(means, torch.zeros(1, 2, 6, 16), means, 2)
    with pytest.raises(ValueError, match="num_tiles \\+ 1 = 6"):
        vsa_select_from_means(means, means, means, 2, torch.zeros(5, dtype=torch.int32))
    # the coarse kernels' configs name the key and what it must be, before any launch
    from tessera.attention.vsa_coarse_triton import vsa_tile_means, vsa_topk_lower_index_wins

    with pytest.raises(ValueError, match="SPLITS must be a positive power of two, got 3"):
        vsa_select_from_means(means, means, means, 2, config=dict(SPLITS=3))
    with pytest.raises(ValueError, match="heads_per_program must be a positive power of two, got 0"):
        vsa_tile_means((means,), torch.zeros(6, dtype=torch.int32), 5, heads_per_program=0)
    with pytest.raises(ValueError, match="ROWS must be a positive power of two, got 6"):
        vsa_topk_lower_index_wins(torch.zeros(4, 5), 2, config=dict(ROWS=6))
    with pytest.raises(ValueError, match="RADIX_BITS must be 1 or 2"):
        vsa_topk_lower_index_wins(torch.zeros(4, 5), 2, config=dict(RADIX_BITS=4))


def test_fake_impl_shape() -> None:
    """The registered op's fake implementation gives the output shape without running the kernel."""
    from tessera.attention.vsa_triton import vsa_fine_attention
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 128, 32, dtype=torch.bfloat16)
        offsets = torch.empty(3, dtype=torch.int32)
        block_index = torch.empty(1, 2, 2, 1, dtype=torch.int32)
        out = vsa_fine_attention(q, q, q, offsets, block_index)
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.gpu
def test_gpu_kernel_d128_bf16() -> None:
    from tessera.attention.vsa_triton import vsa_fine_attention

    gen = torch.Generator().manual_seed(1)
    sizes = tuple([64] * 40 + [48, 64, 17] * 3)
    offsets = _tile_offsets(sizes)
    num_tiles, seq_len = len(sizes), int(offsets[-1])
    batch, heads, head_dim, topk = 1, 4, 128, 7
    q, k, v, gate = (torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(4))
    coarse = torch.randn(batch, heads, num_tiles, head_dim, generator=gen)
    block_index = _random_block_index(batch, heads, num_tiles, topk, gen)
    cast = [t.to(torch.bfloat16) for t in (q, k, v, gate)]
    expected = reference_vsa_fine(*cast[:3], offsets, block_index, coarse, cast[3])
    got = vsa_fine_attention(*(t.cuda() for t in cast[:3]), offsets.cuda(), block_index.cuda(),
                             coarse.cuda(), cast[3].cuda())
    err = (got.float().cpu() - expected).norm() / expected.norm()
    assert err < 1e-2, f"rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bnsd", "bsnd", "fused_qkv", "token_major"])
@pytest.mark.parametrize("load_mode", [None, 0])
def test_gpu_load_modes_and_layouts(layout: str, load_mode: int | None) -> None:
    """Every load path (default: host TMA descriptors where the layout allows, else and 0: masked pointer
    loads) on every layout, with partial tiles in the middle and a partial last tile (the
    TMA boxes then run past the tensor end and past the next tile's start: both must be masked)."""
    from tessera.attention import vsa_triton

    gen = torch.Generator().manual_seed(2)
    sizes = tuple([64] * 20 + [48, 64, 17] * 3 + [33])
    offsets = _tile_offsets(sizes)
    num_tiles, seq_len = len(sizes), int(offsets[-1])
    batch, heads, head_dim, topk = 2, 3, 128, 6
    # base tensors hold q, k, v, gate; views(base) gives the [B, N, S, D] views (same on CPU and GPU)
    if layout == "bnsd":
        base = torch.randn(4, batch, heads, seq_len, head_dim, generator=gen).to(torch.bfloat16)
        views = lambda x: list(x.unbind(0))  # noqa: E731
    elif layout == "bsnd":
        base = torch.randn(4, batch, seq_len, heads, head_dim, generator=gen).to(torch.bfloat16)
        views = lambda x: [t.transpose(1, 2) for t in x.unbind(0)]  # noqa: E731
    elif layout == "fused_qkv":  # views into one [B, S, 4, N, D] projection: no 2D row view, masked pointer loads
        base = torch.randn(batch, seq_len, 4, heads, head_dim, generator=gen).to(torch.bfloat16)
        views = lambda x: [t.transpose(1, 2) for t in x.unbind(2)]  # noqa: E731
    else:  # Ulysses' receive buffer [S, 4, B, N, D]: a 2D row view with batch and heads inside each token row
        base = torch.randn(seq_len, 4, batch, heads, head_dim, generator=gen).to(torch.bfloat16)
        views = lambda x: [t.permute(1, 2, 0, 3) for t in x.unbind(1)]  # noqa: E731
    coarse = torch.randn(batch, heads, num_tiles, head_dim, generator=gen).to(torch.bfloat16)
    scores = torch.rand(batch, heads, num_tiles, num_tiles, generator=gen)
    scores[..., -1] = 2.0  # the partial last tile in every selection
    block_index = scores.topk(topk, dim=-1).indices.to(torch.int32)
    cpu = views(base)
    expected = reference_vsa_fine(*cpu[:3], offsets, block_index, coarse, cpu[3])
    dev = views(base.cuda())
    got = vsa_triton._launch(*dev[:3], offsets.cuda(), block_index.cuda(), coarse.cuda(), dev[3],
                             load_mode=load_mode)
    # the output keeps a dense q's layout; a q sliced out of a fused buffer gets a dense one in q's stride order
    dense_q = layout in ("bnsd", "bsnd")
    assert got.stride() == (dev[0].stride() if dense_q else torch.empty_like(dev[0]).stride())
    if load_mode is None:  # the layouts with a 2D row view take the TMA path
        assert (vsa_triton._default_load_mode(*dev[:3]) == 2) == (layout != "fused_qkv")
    err = (got.float().cpu() - expected).norm() / expected.norm()
    assert err < 1e-2, f"{layout} load_mode={load_mode}: rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bnsd", "bsnd", "token_major"])
@pytest.mark.parametrize("config", [dict(), dict(stages=2), dict(row_box=32), dict(row_box=64)])
def test_gpu_gluon_kernel_matches_reference(layout: str, config: dict) -> None:
    """The Gluon fine kernel (load mode 3) against the fp32 reference: partial query and key tiles in the middle
    and at the end (TMA boxes past the tile and past the tensor), topk below, at and above the ring depth, logits
    that force the running max to be rescaled, with and without the gate, and the output in q's buffer."""
    from tessera.attention import vsa_gluon, vsa_triton

    if not vsa_gluon.gluon_fine_supported(torch.empty(1, 1, 1, 128, dtype=torch.bfloat16, device="cuda")):
        pytest.skip("the Gluon kernel needs compute capability 9.x and triton with Gluon")
    gen = torch.Generator().manual_seed(7)
    sizes = tuple([64] * 9 + [48, 64, 17] * 3 + [16, 64, 32, 60, 5, 33])  # 1 to 4 row boxes
    offsets = _tile_offsets(sizes)
    num_tiles, seq_len = len(sizes), int(offsets[-1])
    batch, heads = 2, 3
    shape = (4, batch, heads, seq_len, 128) if layout == "bnsd" else (4, batch, seq_len, heads, 128)
    base = torch.randn(shape, generator=gen)
    if layout == "bsnd":
        base = base.transpose(2, 3)
    if layout == "token_major":  # Ulysses' receive buffer [S, 4, B, N, D]
        base = torch.randn(seq_len, 4, batch, heads, 128, generator=gen).permute(1, 2, 3, 0, 4)
    base[0, :, 1] *= 4.0  # head 1: growing logits, so the running max moves by far more than 2**8
    base[1, :, 1] *= torch.linspace(0.5, 6.0, seq_len)[:, None]
    q, k, v, gate = base.to(torch.bfloat16).unbind(0)
    coarse = torch.randn(batch, heads, num_tiles, 128, generator=gen).to(torch.bfloat16)
    for topk in (1, 2, 3, 4, 9, num_tiles):
        scores = torch.rand(batch, heads, num_tiles, num_tiles, generator=gen)
        scores[..., -1] = 2.0  # the partial last tile in every selection
        block_index = scores.topk(topk, dim=-1).indices.to(torch.int32)
        starts, ends = offsets[block_index.long()], offsets[block_index.long() + 1]
        spans = ((starts << 7) | (ends - starts)).to(torch.int32).cuda()
        for with_gate in (False, True):
            g, c = (gate, coarse) if with_gate else (None, None)
            expected = reference_vsa_fine(q, k, v, offsets, block_index, c, g)
            dev_all = base.to(torch.bfloat16).cuda().unbind(0)  # fresh (into_q overwrites q); sliced on the GPU
            dev = list(dev_all[:3])
            send = torch.empty(seq_len, batch, heads, 128, device="cuda", dtype=torch.bfloat16)  # Ulysses' send
            outs = {"new": None, "send": send.permute(1, 2, 0, 3), "into_q": dev[0]}  # into_q last: it overwrites q
            for into_q, out in outs.items():
                if into_q == "send" and layout != "token_major":
                    continue
                got = vsa_triton._launch(*dev, offsets.cuda(), spans, None if c is None else c.cuda(),
                                         None if g is None else dev_all[3], load_mode=3, config=config, spans=True,
                                         out=out)
                assert got.stride() == (torch.empty_like(dev[0]) if out is None else out).stride()
                err = (got.float().cpu() - expected).norm() / expected.norm()
                assert err < 1e-2, f"{layout} {config} topk={topk} gate={with_gate} out={into_q}: {err:.2e}"


@pytest.mark.gpu
def test_gpu_gluon_kernel_runs_two_programs_per_sm() -> None:
    """The occupancy the Gluon schedule is built for, as the driver computes it for the compiled kernel."""
    import ctypes

    from tessera.attention import build_vsa_metadata, vsa_coarse_triton, vsa_gluon, vsa_triton

    q = torch.randn(1, 2, 64 * 24, 128, device="cuda", dtype=torch.bfloat16)
    if not vsa_gluon.gluon_fine_supported(q):
        pytest.skip("the Gluon kernel needs compute capability 9.x and triton with Gluon")
    metadata = build_vsa_metadata((4, 8, 48), 0.5, "cuda")
    means = vsa_coarse_triton.vsa_tile_means((q, q, q), metadata.tile_offsets, metadata.num_tiles)
    _, coarse, spans = vsa_coarse_triton.vsa_select_from_means(*means, metadata.topk, metadata.tile_offsets)
    vsa_triton._launch(q, q, q, metadata.tile_offsets, spans, coarse, q, load_mode=3, spans=True)
    kernel = list(vsa_gluon._vsa_fine_gluon_kernel.device_caches[q.device.index][0].values())[-1]
    kernel._init_handles()
    blocks = ctypes.c_int()
    status = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(blocks), ctypes.c_void_p(kernel.function), 8 * 32, ctypes.c_size_t(kernel.metadata.shared))
    assert status == 0
    assert blocks.value >= 2, f"{blocks.value} program(s) per SM"


@pytest.mark.gpu
def test_gpu_tile_means_match_spec_bf16() -> None:
    """On GPUs fp32 -> bf16 rounds to nearest, so only summation-order ties may differ (rarely)."""
    from tessera.attention.vsa import _tile_means, build_vsa_metadata
    from tessera.attention.vsa_coarse_triton import vsa_tile_means

    metadata = build_vsa_metadata((9, 14, 22), 0.9, "cuda")
    x = torch.randn(1, metadata.total_seq_length, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    got = vsa_tile_means((x,), metadata.tile_offsets, metadata.num_tiles)[0]
    spec = _tile_means(x, metadata)
    assert (got != spec).float().mean().item() < 1e-2  # summation order flips a rounding now and then
    torch.testing.assert_close(got.float(), spec.float(), rtol=2.0**-7, atol=1e-6)



@pytest.mark.gpu
def test_gpu_topk_and_coarse_stage_match_spec() -> None:
    """At the Wan-1.3B tile count: the top-k equals the spec exactly on tied scores; the whole coarse stage
    equals it on exactly representable means, and on random bf16 means up to rare summation-order flips."""
    from tessera.attention.vsa import _topk_lower_index_wins, select_from_tile_means
    from tessera.attention.vsa_coarse_triton import vsa_select_from_means, vsa_topk_lower_index_wins

    gen = torch.Generator().manual_seed(4)
    scores = _tied_scores((4, 624, 624), gen).cuda()
    for topk in (1, 63, 624):
        assert torch.equal(vsa_topk_lower_index_wins(scores, topk), _topk_lower_index_wins(scores, topk))
    scores = _tied_scores((1, 3, 1440), gen).cuda()  # the 14B-720p row width: 2 rows per program
    assert torch.equal(vsa_topk_lower_index_wins(scores, 72), _topk_lower_index_wins(scores, 72))

    exact = [torch.randint(-2, 3, (1, 12, 624, 128), generator=gen).to(torch.bfloat16).cuda() for _ in range(3)]
    random = [torch.randn(1, 12, 624, 128, generator=gen).to(torch.bfloat16).cuda() for _ in range(3)]
    for means, min_same in ((exact, 1.0), (random, 0.99)):
        block_index, coarse, _ = vsa_select_from_means(*means, 63)
        spec_index, spec_coarse = select_from_tile_means(*means, 63)
        assert (block_index == spec_index).all(-1).float().mean().item() >= min_same
        err = (coarse - spec_coarse).norm() / spec_coarse.norm()
        assert err < 1e-4, f"coarse rel err {err:.2e}"  # 3xTF32 products, online softmax



@pytest.mark.gpu
@pytest.mark.parametrize("consume_q", [False, True])
def test_gpu_full_call_matches_reference(consume_q: bool) -> None:
    """The four-launch VSA call (means, scores + coarse, top-k, fine) equals the torch spec on a grid with partial
    tiles on every axis, B=2 and [B, S, N, D] inputs; with consume_q the output lands in q's buffer."""
    from tessera.attention import VSAAttention, build_vsa_metadata, vsa_attention_reference

    metadata = build_vsa_metadata((6, 10, 13), 0.7, "cuda")
    gen = torch.Generator().manual_seed(6)
    q, k, v, gate = (torch.randn(2, metadata.total_seq_length, 3, 128, generator=gen).to(torch.bfloat16).cuda()
                     .transpose(1, 2) for _ in range(4))
    expected = vsa_attention_reference(q, k, v, gate, metadata).float()  # the spec: means rounded to bf16
    q_ptr = q.data_ptr()
    got = VSAAttention(metadata, impl="triton", consume_q=consume_q)(q, k, v, gate)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert (got.data_ptr() == q_ptr) == consume_q
    err = (got.float() - expected).norm() / expected.norm()
    assert err < 1e-2, f"rel err {err:.2e}"


_FIRST_CALL_CONSUMES_Q = """
import torch
from tessera.attention import VSAAttention, build_vsa_metadata, vsa_attention_reference
metadata = build_vsa_metadata((6, 10, 13), 0.5, "cuda")
gen = torch.Generator().manual_seed(2)
q, k, v, gate = (torch.randn(2, metadata.total_seq_length, 3, 128, generator=gen).cuda().transpose(1, 2)
                 for _ in range(4))
expected = vsa_attention_reference(q, k, v, gate, metadata)
got = VSAAttention(metadata, impl="triton", consume_q=True)(q, k, v, gate)  # the process's first fine call: autotunes
print(((got - expected).norm() / expected.norm()).item())
"""


@pytest.mark.gpu
def test_gpu_autotuned_first_call_with_output_in_q_fp32() -> None:
    """fp32 takes the autotuned pointer kernel; its first call benchmarks every config. With the output in q's buffer
    (the one-rank DiT path) each benchmark run overwrote q unless OUT is restored between runs: a fresh process, so
    the autotuner is cold."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_CONSUMES_Q], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5


def test_autotuned_kernel_restores_its_output_between_configs() -> None:
    """The CPU half of the check above (the autotuner cannot run under the interpreter): OUT is restored."""
    from tessera.attention.vsa_triton import _vsa_fine_kernel_tuned

    assert _vsa_fine_kernel_tuned.restore_value == ["OUT"]

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    if sys.argv[1] == "layout":
        _check_layouts_and_means()
    elif sys.argv[1] == "select":
        _check_select()
    else:
        _check_case(getattr(torch, sys.argv[1]), int(sys.argv[2]), seed=int(sys.argv[2]))
    print("ok")


@pytest.mark.parametrize("layout", ["bsnd", "bnsd", "token_major", "token_major_b1", "fused_qkv"])
def test_host_desc_view_addresses_every_row(layout: str) -> None:
    """The TMA path's 2D row view: token s of (b, n) sits at row b*row_b + n*row_n + s, columns b*col_b + n*col_n
    onwards, for each layout it accepts; a fused [B, S, 4, N, D] slice (no uniform row pitch) gets None."""
    from tessera.attention.vsa_triton import _host_desc_view

    B, N, S, D = (1 if layout == "token_major_b1" else 2), 3, 11, 16
    base = torch.randn(S * 4 * B * N * D)
    if layout == "bsnd":
        x = base[: B * S * N * D].view(B, S, N, D).transpose(1, 2)
    elif layout == "bnsd":
        x = base[: B * N * S * D].view(B, N, S, D)
    elif layout.startswith("token_major"):
        x = base.view(S, 4, B, N, D)[:, 2].permute(1, 2, 0, 3)  # the third input of Ulysses' receive buffer
    else:
        x = base.view(B, S, 4, N, D)[:, :, 1].transpose(1, 2)
    view = _host_desc_view(x)
    if layout == "fused_qkv":
        assert view is None
        return
    rows, row_b, row_n, col_n, col_b = view
    for b in range(B):
        for n in range(N):
            for s in range(S):
                col = b * col_b + n * col_n
                assert torch.equal(rows[b * row_b + n * row_n + s, col : col + D], x[b, n, s]), (b, n, s)


def _compile_coarse_for_hopper(kernel, types: dict, constants: dict, num_warps: int) -> str:
    """PTX of one coarse-stage kernel compiled for sm_90 on this machine (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    return compiled.asm["ptx"]


def test_coarse_kernels_and_their_variants_compile_for_hopper() -> None:
    """Every coarse-stage config the GPU bench times compiles for sm_90 (the interpreter checks their numbers, not
    their compilation); tile means over h heads per program issue h times the global loads of one head (the
    addressing across heads keeps one head's vector width)."""
    from tessera.attention import vsa_coarse_triton as coarse

    def loads(ptx: str) -> int:
        return ptx.count("ld.global")

    means_types = dict(X0="*bf16", X1="*bf16", X2="*bf16", OUT="*bf16", TILE_OFFSETS="*i32", stride_xb="i64",
                       stride_xn="i64", stride_xs="i64")
    per_head = [loads(_compile_coarse_for_hopper(coarse._tile_means_kernel, means_types,
                                                 dict(HEAD_DIM=128, BLOCK_M=64, HEADS=heads), 2)) - 2  # 2 offsets
                for heads in (1, 2, 4)]
    assert per_head == [per_head[0], 2 * per_head[0], 4 * per_head[0]], per_head
    coarse_types = dict(QC="*bf16", KC="*bf16", VC="*bf16", SCORES="*fp32", COARSE="*fp32", scale="fp32")
    for splits in (1, 4):
        _compile_coarse_for_hopper(coarse._coarse_kernel, coarse_types, dict(
            HEAD_DIM=128, BLOCK_Q=32, BLOCK_K=32, SCORE_PRECISION="tf32", COARSE_PRECISION="tf32x3",
            DOT_IN_FP32=False, SPLITS=splits), 4)
    _compile_coarse_for_hopper(coarse._combine_kernel, dict(PARTS="*fp32", COARSE="*fp32"),
                               dict(HEAD_DIM=128, SPLITS=4, BLOCK_R=16), 4)
    select_types = dict(SCORES="*fp32", OUT="*i32", TILE_OFFSETS="*i32", SPANS="*i32")
    for rows, radix_bits, early in ((1, 1, False), (1, 1, True), (4, 1, False), (4, 2, True)):
        _compile_coarse_for_hopper(coarse._select_kernel, select_types, dict(
            C_PAD=1024, WRITE_SPANS=True, ROWS=rows, RADIX_BITS=radix_bits, EARLY_EXIT=early, FULL_TILE=64), 2 * rows)
