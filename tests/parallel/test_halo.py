"""The halo exchange of `parallel/halo.py` against a slow reference: the full tensor, zero-padded, sliced.

Unit tests for the split itself; then one spawned gloo job per world size (2, 3) runs every case on random tensors
with awkward sizes (row counts that do not divide, fewer rows than ranks, halos of 2 rows, non-contiguous and
upsampled blocks) and returns the mismatches; the parent asserts. Every rank knows the full tensor (same seed), so
the reference is exactly "gather everything, pad, slice".
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_multirank
from tessera.parallel import ParallelMesh, RowSplit, build_mesh, build_row_split

# (full shape, split dim, halo rows k, min rows per rank, scale): the tensor holds `scale` x the split's rows at dim.
CASES = [
    ((2, 3, 7, 5), 2, 1, 1, 1),  # 7 rows: 4+3 on 2 ranks, 3+2+2 on 3
    ((2, 3, 7, 5), -2, 1, 1, 1),  # negative dim
    ((5, 4, 3), 0, 2, 2, 1),  # halo of 2 rows; 5 // 2 = 2 blocks: the third rank holds none
    ((3, 2, 6), 2, 1, 1, 1),  # even split on 2 and 3 ranks
    ((1, 2, 2, 4), 2, 1, 1, 1),  # 2 rows: the third rank holds none
    ((2, 22, 3), 1, 1, 1, 2),  # 11 rows upsampled 2x: blocks of 12+10 / 8+8+6 rows
    ((2, 4, 11, 3), 2, 3, 3, 1),  # halo of 3 rows: a block of 3 rows sends all of them
]
_COMM_CALLS = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "gather",
               "scatter", "reduce_scatter", "barrier", "send", "recv", "batch_isend_irecv")


def _mesh(world_size: int, rank: int) -> ParallelMesh:
    return ParallelMesh(world_size=world_size, rank=rank, local_rank=rank, cfg_size=1, cfg_rank=0, sp_size=world_size,
                        sp_rank=rank, sp_group=None, cfg_group=None, device=torch.device("cpu"))


def test_split_sizes_and_fallback_to_fewer_ranks() -> None:
    rows = build_row_split(7, _mesh(3, 1))
    assert (rows.sizes, rows.ranks, rows.offsets) == ((3, 2, 2), (0, 1, 2), (0, 3, 5, 7))
    assert (rows.index, rows.num_rows, rows.num_ranks) == (1, 7, 3)
    few = build_row_split(2, _mesh(4, 3))  # more ranks than rows: two blocks, rank 3 holds nothing
    assert (few.sizes, few.ranks, few.holds_rows, few.index) == ((1, 1), (0, 1), False, None)
    assert build_row_split(5, _mesh(4, 0), min_rows=2).sizes == (3, 2)
    assert build_row_split(1, _mesh(4, 0), min_rows=3).sizes == (1,)  # never fewer than one block
    with pytest.raises(ValueError, match="num_rows=0"):
        build_row_split(0, _mesh(2, 0))


def test_one_block_is_zero_padding_and_shard_scales() -> None:
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    rows = build_row_split(5, _mesh(1, 0))
    assert torch.equal(rows.halo_pad(x, 1, 2), F.pad(x, (0, 0, 2, 2)))
    split = RowSplit(sizes=(3, 2), ranks=(0, 1), rank=1)
    assert torch.equal(split.shard(torch.arange(10), 0), torch.arange(6, 10))  # 2x the rows: block 1 is [6, 10)


def _reference_halo(full: torch.Tensor, dim: int, k: int, start: int, rows: int) -> torch.Tensor:
    shape = list(full.shape)
    shape[dim] = k
    padded = torch.cat([full.new_zeros(shape), full, full.new_zeros(shape)], dim=dim)
    return padded.narrow(dim, start, rows + 2 * k)  # padded rows [start, start + rows + 2k) = full's [start - k, ...)


@contextlib.contextmanager
def _count_comm():
    counts, originals = Counter(), {name: getattr(dist, name) for name in _COMM_CALLS}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _check_case(mesh: ParallelMesh, case_index: int, stage_on_host: bool) -> list[str]:
    shape, dim, k, min_rows, scale = CASES[case_index]
    dim %= len(shape)
    full = torch.randn(shape, generator=torch.Generator().manual_seed(case_index))
    rows = build_row_split(shape[dim] // scale, mesh, min_rows=min_rows)
    rows = RowSplit(sizes=rows.sizes, ranks=rows.ranks, rank=rows.rank, stage_on_host=stage_on_host)
    name, bad = f"case{case_index}{'/host' if stage_on_host else ''}", []
    with _count_comm() as counts:
        if not rows.holds_rows:
            assert rows.gather(full, dim) is None
            return [f"{name}: rank {mesh.rank} without rows communicated {dict(counts)}"] if counts else []
        block = rows.shard(full, dim)
        if case_index % 2:  # a non-contiguous block with the same values
            block = block.transpose(0, -1).contiguous().transpose(0, -1)
        start, size = rows.offsets[rows.index] * scale, rows.sizes[rows.index] * scale
        reference = _reference_halo(full, dim, k, start, size)
        if not torch.equal(rows.halo_pad(block, dim, k), reference):
            bad.append(f"{name}: halo_pad")
        garbage = torch.full_like(reference, float("nan"))
        garbage.narrow(dim, k, size).copy_(block)
        if not torch.equal(rows.fill_halo_(garbage, dim, k), reference):
            bad.append(f"{name}: fill_halo_")
        if not torch.equal(rows.all_gather(block, dim), full):
            bad.append(f"{name}: all_gather")
        gathered = rows.gather(block, dim)
        if (gathered is None) != (rows.index != 0) or (gathered is not None and not torch.equal(gathered, full)):
            bad.append(f"{name}: gather")
    if set(counts) - {"batch_isend_irecv"}:  # point-to-point only: ranks without rows take no part
        bad.append(f"{name}: used collectives {dict(counts)}")
    return bad


def _job(rank: int, world_size: int) -> list[str]:
    mesh = build_mesh(cfg=1, sp=world_size, device=torch.device("cpu"))
    return [msg for i in range(len(CASES)) for host in (False, True) for msg in _check_case(mesh, i, host)]


@pytest.mark.multirank
@pytest.mark.parametrize("world_size", [2, 3])
def test_halo_exchange_matches_padded_full_tensor(world_size: int) -> None:
    for rank, bad in enumerate(run_multirank(_job, world_size)):
        assert not bad, f"rank {rank} of {world_size}: {bad}"
