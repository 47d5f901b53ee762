"""Halo exchange for a tensor split into contiguous row blocks along one dim (the parallel VAE decode).

`halo_pad` gives a rank's block with `k` rows of each neighbour around it (zeros past the global edges, as zero
padding of the full tensor), so a stride-1 convolution with padding `k` computes exactly this block's rows; uneven
blocks, ranks without rows, and blocks upsampled by an integer factor work. Point-to-point only: ranks without rows
take no part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tessera.parallel.mesh import ParallelMesh
from tessera.parallel.sequence import _offsets, split_sizes

__all__ = ["RowSplit", "build_row_split"]


@dataclass(frozen=True)
class RowSplit:
    """`num_rows` rows in contiguous blocks: block i (`sizes[i]` rows) on global rank `ranks[i]`, in row order.

    `index` is this rank's block (None when it holds no rows). `stage_on_host`: exchange device tensors through
    host copies (gloo cannot send device memory). Sizes are those of the base tensor; a tensor whose blocks hold
    `f` times as many rows (`f` integer, the same on every rank) is split the same way.
    """

    sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    rank: int
    stage_on_host: bool = False
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        assert len(self.sizes) == len(self.ranks) >= 1 and min(self.sizes) >= 1, (self.sizes, self.ranks)
        object.__setattr__(self, "offsets", _offsets(list(self.sizes)))

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def num_rows(self) -> int:
        return self.offsets[-1]

    @property
    def index(self) -> int | None:
        return self.ranks.index(self.rank) if self.rank in self.ranks else None

    @property
    def holds_rows(self) -> bool:
        return self.rank in self.ranks

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's block of a full tensor (a view): rows [offset * f, (offset + size) * f) at `dim`, where
        `f = full.shape[dim] / num_rows`."""
        factor = _factor(full.shape[dim], self.num_rows)
        return full.narrow(dim, self.offsets[self.index] * factor, self.sizes[self.index] * factor)

    def halo_pad(self, x: torch.Tensor, dim: int, k: int) -> torch.Tensor:
        """x: this rank's block [..., R, ...] (R rows at `dim`, R >= k) -> [..., k + R + k, ...]: the previous
        block's last k rows, x, the next block's first k rows; zeros past the first and last block. A new tensor."""
        shape = list(x.shape)
        shape[dim] += 2 * k
        padded = x.new_empty(shape)
        padded.narrow(dim, k, x.shape[dim]).copy_(x)
        return self.fill_halo_(padded, dim, k)

    def fill_halo_(self, padded: torch.Tensor, dim: int, k: int) -> torch.Tensor:
        """In place: overwrite the k rows at each end of `padded` (this rank's block already padded by k along
        `dim`, any values there) with the neighbouring blocks' boundary rows, zeros past the global edges.

        Every other dim must have the same extent on every rank (pad the others before, as `F.pad` does). One
        point-to-point round trip with each neighbour. Returns `padded`."""
        if k == 0:
            return padded
        i, rows = self.index, padded.shape[dim] - 2 * k
        assert i is not None and rows >= k, f"a halo of {k} rows needs >= {k} rows per rank, block has {rows}"
        top, bottom = padded.narrow(dim, 0, k), padded.narrow(dim, k + rows, k)
        # My first k rows go to the previous block, my last k to the next; their boundary rows come back.
        neighbours = []
        for edge, mine, j in ((top, padded.narrow(dim, k, k), i - 1), (bottom, padded.narrow(dim, rows, k), i + 1)):
            if 0 <= j < self.num_ranks:
                neighbours.append((edge, mine, j))
            else:  # a global edge: the zero padding of the full tensor
                edge.zero_()
        received = [torch.empty(edge.shape, dtype=edge.dtype, device=edge.device) for edge, _, _ in neighbours]
        self._exchange([(mine, j) for _, mine, j in neighbours],
                       [(buf, j) for buf, (_, _, j) in zip(received, neighbours, strict=True)])
        for buf, (edge, _, _) in zip(received, neighbours, strict=True):
            edge.copy_(buf)
        return padded

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x: this rank's block [..., R, ...] -> the full tensor [..., num_rows * f, ...] (f = R / its base rows),
        blocks in row order, on every rank that holds rows. Each block goes point-to-point to every other one."""
        factor = _factor(x.shape[dim], self.sizes[self.index])
        pieces = [x if j == self.index else _new_block(x, dim, size * factor) for j, size in enumerate(self.sizes)]
        others = [j for j in range(self.num_ranks) if j != self.index]
        self._exchange([(x, j) for j in others], [(pieces[j], j) for j in others])
        return torch.cat(pieces, dim)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor | None:
        """x: this rank's block -> the full tensor on the first block's rank, None on the others (the others send
        theirs to it point-to-point). A rank that holds no rows takes no part (None)."""
        if not self.holds_rows:
            return None
        if self.index != 0:
            self._exchange([(x, 0)], [])
            return None
        factor = _factor(x.shape[dim], self.sizes[0])
        pieces = [x, *(_new_block(x, dim, size * factor) for size in self.sizes[1:])]
        self._exchange([], [(pieces[j], j) for j in range(1, self.num_ranks)])
        return torch.cat(pieces, dim)

    def _exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Post every send and receive (peers are block indices; receive buffers contiguous) at once, wait for all."""
        if not sends and not recvs:
            return
        if self.stage_on_host:
            host_recvs = [(torch.empty(buf.shape, dtype=buf.dtype), peer) for buf, peer in recvs]
            ops = [dist.P2POp(dist.isend, t.contiguous().cpu(), self.ranks[peer]) for t, peer in sends]
            ops += [dist.P2POp(dist.irecv, buf, self.ranks[peer]) for buf, peer in host_recvs]
        else:
            ops = [dist.P2POp(dist.isend, t.contiguous(), self.ranks[peer]) for t, peer in sends]
            ops += [dist.P2POp(dist.irecv, buf, self.ranks[peer]) for buf, peer in recvs]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if self.stage_on_host:
            for (buf, _), (host, _) in zip(recvs, host_recvs, strict=True):
                buf.copy_(host)


def build_row_split(num_rows: int, mesh: ParallelMesh, *, min_rows: int = 1) -> RowSplit:
    """Split `num_rows` rows over the mesh's first `min(world, num_rows // min_rows)` ranks (at least one), in rank
    order, sizes differing by at most one (the first `num_rows % n` blocks get the extra row). `min_rows`: the
    fewest rows a block may hold (a halo of k rows needs k)."""
    if num_rows < 1 or min_rows < 1:
        raise ValueError(f"build_row_split: num_rows={num_rows} and min_rows={min_rows} must be >= 1")
    num_ranks = max(1, min(mesh.world_size, num_rows // min_rows))
    stage = num_ranks > 1 and mesh.device.type != "cpu" and dist.get_backend() == "gloo"
    return RowSplit(sizes=tuple(split_sizes(num_rows, num_ranks)), ranks=tuple(range(num_ranks)), rank=mesh.rank,
                    stage_on_host=stage)


def _factor(extent: int, base: int) -> int:
    factor, rest = divmod(extent, base)
    assert rest == 0 and factor >= 1, f"{extent} rows are not a whole multiple of the split's {base}"
    return factor


def _new_block(like: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    shape = list(like.shape)
    shape[dim] = rows
    return like.new_empty(shape)
