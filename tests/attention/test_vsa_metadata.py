"""VSA metadata, tile/untile and the metadata cache, checked against slow python-loop index tables."""

import math
import time

import pytest
import torch
from tessera.attention import (
    MetadataCache,
    VSAAttention,
    build_vsa_metadata,
    get_backend,
    tile,
    untile,
    vsa_topk,
)


def _slow_tiles(grid, tile_size):
    """Raster token indices of each tile: tiles in raster order of tile coords, tokens raster inside."""
    (T, H, W), (a, b, c) = grid, tile_size
    tiles = []
    for tt in range(math.ceil(T / a)):
        for th in range(math.ceil(H / b)):
            for tw in range(math.ceil(W / c)):
                tiles.append(
                    [
                        (t * H + h) * W + w
                        for t in range(tt * a, min(T, tt * a + a))
                        for h in range(th * b, min(H, th * b + b))
                        for w in range(tw * c, min(W, tw * c + c))
                    ]
                )
    return tiles


def _slow_tables(grid, tile_size):
    tiles = _slow_tiles(grid, tile_size)
    volume = math.prod(tile_size)
    forward = [r for toks in tiles for r in toks]
    reverse = [0] * len(forward)
    for p, r in enumerate(forward):
        reverse[r] = p  # raster -> tile-order position
    non_pad = [i * volume + j for i, toks in enumerate(tiles) for j in range(len(toks))]
    combined = [non_pad[reverse[r]] for r in range(len(forward))]  # the two-step index, slowly
    return tiles, forward, reverse, non_pad, combined


@pytest.mark.parametrize(
    "grid, tile_size",
    [
        ((5, 7, 9), (4, 4, 4)),
        ((4, 4, 4), (4, 4, 4)),
        ((8, 9, 13), (4, 4, 4)),
        ((21, 30, 52), (4, 4, 4)),
        ((5, 7, 9), (2, 3, 4)),
        ((4, 1, 6), (1, 1, 4)),
    ],
)
def test_indices_match_slow_tables(grid, tile_size):
    m = build_vsa_metadata(grid, 0.5, "cpu", tile=tile_size)
    tiles, forward, reverse, non_pad, combined = _slow_tables(grid, tile_size)
    assert m.grid == grid and m.tile_size == tile_size
    assert m.num_tiles == len(tiles) == math.prod(m.num_tiles_per_axis)
    assert m.total_seq_length == math.prod(grid)
    assert m.tile_partition_indices.dtype == torch.int64
    assert m.tile_partition_indices.tolist() == forward
    assert m.reverse_tile_partition_indices.tolist() == reverse
    assert m.non_pad_index.tolist() == non_pad
    assert m.untile_combined_index.tolist() == combined
    sizes = [len(t) for t in tiles]
    assert m.variable_block_sizes.dtype == torch.int32 and m.variable_block_sizes.tolist() == sizes
    assert m.tile_offsets.dtype == torch.int32
    assert m.tile_offsets.tolist() == [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    assert m.token_tile_ids.tolist() == [i for i, toks in enumerate(tiles) for _ in toks]


def test_reference_tables_are_built_on_first_use_only():
    """A request keeps the token order, its inverse and the tile offsets (on the host for a CUDA device, see
    ``test_gpu_tables_stay_on_the_host``); the four tables of the plain-PyTorch reference and tile/untile appear (all
    at once, then cached) when first read, and so does the device copy of the tile offsets."""
    m = build_vsa_metadata((21, 30, 52), 0.9, "cpu")
    assert not m._reference and "tile_offsets" not in vars(m)
    held = (m.tile_partition_indices, m.reverse_tile_partition_indices, m.tile_offsets_host)
    assert sum(t.numel() * t.element_size() for t in held) == 2 * 32760 * 8 + 625 * 4
    assert m.tile_offsets is m.tile_offsets  # read once, then kept
    sizes = m.variable_block_sizes
    assert set(m._reference) == {"variable_block_sizes", "token_tile_ids", "non_pad_index", "untile_combined_index"}
    assert m.variable_block_sizes is sizes and sizes.device == m.device and int(sizes.sum()) == 32760


def test_tile_untile_reuses_buffer_and_keeps_pads_zero():
    grid = (5, 7, 9)
    m = build_vsa_metadata(grid, 0.5, "cpu")
    *_, combined = _slow_tables(grid, (4, 4, 4))
    S, padded_len = math.prod(grid), m.num_tiles * 64
    pad_mask = torch.ones(padded_len, dtype=torch.bool)
    pad_mask[torch.tensor(combined)] = False
    assert m.tile_buf is None and int(pad_mask.sum()) == padded_len - S

    data_ptr = None
    for seed in range(3):  # several calls with new data: same storage, correct contents every time
        x = torch.randn(2, 3, S, 8, generator=torch.Generator().manual_seed(seed)) + 0.5
        buf = tile(x, m)
        assert buf is m.tile_buf and buf.shape == (2, 3, padded_len, 8)
        data_ptr = data_ptr or buf.data_ptr()
        assert buf.data_ptr() == data_ptr
        assert torch.equal(buf[:, :, torch.tensor(combined)], x)
        assert torch.count_nonzero(buf[:, :, pad_mask]) == 0
        assert torch.equal(untile(buf, m), x)

    x16 = torch.randn(2, 3, S, 8).bfloat16()  # dtype change -> new buffer
    buf16 = tile(x16, m)
    assert buf16.dtype == torch.bfloat16 and buf16 is m.tile_buf and buf16.data_ptr() != data_ptr
    assert torch.equal(untile(buf16, m), x16) and torch.count_nonzero(buf16[:, :, pad_mask]) == 0

    x2 = torch.randn(S, 4)  # shape change (no batch dims) -> new buffer
    buf2 = tile(x2, m)
    assert buf2 is m.tile_buf and buf2.data_ptr() not in (data_ptr, buf16.data_ptr())
    assert buf2.shape == (padded_len, 4) and torch.equal(untile(buf2, m), x2)


@pytest.mark.parametrize(
    "grid, tile_size, lead",
    [((8, 9, 13), (4, 4, 4), (1, 2)), ((5, 7, 9), (2, 3, 4), (3,)), ((4, 4, 4), (4, 4, 4), ()),
     ((6, 5, 11), (3, 2, 5), (2, 1))],
)
def test_tile_untile_other_grids_and_steps(grid, tile_size, lead):
    """Other grids and tile shapes (with and without pad slots), fp32 and bf16, over several 'steps':
    tile puts each raster token in its tile's slot (the slow tables), pads stay zero, untile inverts it."""
    m = build_vsa_metadata(grid, 0.5, "cpu", tile=tile_size)
    *_, combined = _slow_tables(grid, tile_size)
    S, padded_len = math.prod(grid), m.num_tiles * math.prod(tile_size)
    pad_mask = torch.ones(padded_len, dtype=torch.bool)
    pad_mask[torch.tensor(combined)] = False
    for dtype in (torch.float32, torch.bfloat16):
        data_ptr = None
        for step in range(3):
            x = (torch.randn(*lead, S, 5, generator=torch.Generator().manual_seed(step)) + 0.5).to(dtype)
            buf = tile(x, m)
            assert buf is m.tile_buf and buf.dtype == dtype and buf.shape == (*lead, padded_len, 5)
            data_ptr = data_ptr or buf.data_ptr()
            assert buf.data_ptr() == data_ptr  # reused across steps
            assert torch.equal(buf[..., torch.tensor(combined), :], x)
            assert torch.count_nonzero(buf[..., pad_mask, :]) == 0
            assert torch.equal(untile(buf, m), x)


@pytest.mark.parametrize("grid", [(3, 8, 8), (8, 2, 8), (8, 8, 3), (1, 1, 1)])
def test_grid_smaller_than_one_tile_raises(grid):
    with pytest.raises(ValueError, match="attention.backend=dense"):
        build_vsa_metadata(grid, 0.9, "cpu")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_sparsity_names_the_key(sparsity):
    with pytest.raises(ValueError, match="attention.sparsity"):
        build_vsa_metadata((8, 8, 8), sparsity, "cpu")
    with pytest.raises(TypeError, match="attention.sparsity"):
        build_vsa_metadata((8, 8, 8), True, "cpu")


def test_topk_is_exact_integer_arithmetic():
    assert vsa_topk(0.95, 1440) == 72
    assert vsa_topk(0.9, 624) == 63
    assert vsa_topk(0.0, 624) == 624
    assert vsa_topk(0, 7) == 7
    assert vsa_topk(0.999999, 1440) == 1
    assert vsa_topk(0.5, 1) == 1
    for percent in range(100):  # agrees with integer-only ceil((100 - p) * n / 100)
        for n in (1, 7, 624, 1440):
            assert vsa_topk(percent / 100, n) == max(1, -(-(100 - percent) * n // 100))
    m = build_vsa_metadata((21, 45, 80), 0.95, "cpu")
    assert (m.num_tiles, m.topk, m.sparsity) == (1440, 72, 0.95)


def test_large_grid_builds_fast():
    build_vsa_metadata((4, 4, 4), 0.9, "cpu")  # warm up torch's first-call overheads
    start = time.perf_counter()
    m = build_vsa_metadata((21, 45, 80), 0.9, "cpu")
    assert time.perf_counter() - start < 1.0
    assert m.total_seq_length == 75_600
    assert torch.equal(m.tile_partition_indices[m.reverse_tile_partition_indices], torch.arange(75_600))


def test_cache_is_keyed_by_backend_grid_sparsity_device():
    cache, vsa, dense = MetadataCache(), get_backend("vsa"), get_backend("dense")
    a = cache.get(vsa, (5, 7, 9), 0.9, "cpu")
    assert cache.get(vsa, (5, 7, 9), 0.9, torch.device("cpu")) is a
    assert cache.get(vsa, (5, 7, 9), 0.5, "cpu") is not a
    assert cache.get(vsa, (5, 7, 10), 0.9, "cpu") is not a
    assert cache.get(dense, (5, 7, 9), 0.9, "cpu") is None  # dense builds no metadata
    assert len(cache) == 3 and a.device == torch.device("cpu") and a.grid == (5, 7, 9)
    assert MetadataCache().get(vsa, (5, 7, 9), 0.9, "cpu") is not a  # no hidden global state


@pytest.mark.gpu
def test_gpu_tables_stay_on_the_host():
    """A CUDA request holds no table on the device: the token order, its inverse and the tile offsets are pinned host
    tables that the DiT (per forward) and each VSA call copy in (the runtime's forwards, graphed too: tests/runtime);
    the device copy of the offsets exists only once read (benchmarks, direct kernel calls)."""
    m = build_vsa_metadata((21, 30, 52), 0.9, "cuda")
    for table in (m.tile_partition_indices, m.reverse_tile_partition_indices, m.tile_offsets_host):
        assert table.device.type == "cpu" and table.is_pinned()
    q, k, v, gate = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    vsa = VSAAttention(m, impl="triton")
    vsa(q, k, v, gate)  # the first call compiles (its output is freed at once)
    allocated = torch.cuda.memory_allocated()
    expected = vsa(q, k, v, gate)
    # the output and at most 24 KiB (seen on an H200, session 16, not yet explained): no [S] table (128-256 KiB)
    extra = torch.cuda.memory_allocated() - allocated - expected.numel() * expected.element_size()
    assert 0 <= extra <= 32 * 1024, extra
    assert "tile_offsets" not in vars(m)  # the calls made their own copies
    assert m.tile_offsets.is_cuda and torch.equal(m.tile_offsets.cpu(), m.tile_offsets_host)
    cpu = build_vsa_metadata((21, 30, 52), 0.9, "cpu")
    assert torch.equal(m.tile_partition_indices, cpu.tile_partition_indices)
