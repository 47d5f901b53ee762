"""Sequence shard plans: which contiguous slice of the token sequence each SP rank owns.

Built once per request (the token count is fixed for a request) and passed to whoever shards or
gathers. Shards are contiguous and uneven when needed: the first ``seq_len % sp_size`` ranks own one
extra token, so any token count works on any number of ranks without padding tokens.

Legend: B batch, S tokens, C channels; ``local_*`` = this rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["SequenceShardPlan", "split_sizes"]


def split_sizes(total: int, parts: int) -> list[int]:
    """Split ``total`` items into ``parts`` contiguous chunks whose sizes differ by at most 1.

    The first ``total % parts`` chunks get one extra item; chunks may be empty when
    ``total < parts``. Used for both token shards and Ulysses head slices.
    """
    if parts < 1:
        raise ValueError(f"split_sizes: parts must be >= 1, got {parts}")
    if total < 0:
        raise ValueError(f"split_sizes: total must be >= 0, got {total}")
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def _offsets(sizes: list[int]) -> tuple[int, ...]:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return tuple(offsets)


@dataclass(frozen=True)
class SequenceShardPlan:
    """Contiguous, possibly uneven split of ``seq_len`` tokens over ``sp_size`` ranks.

    Attributes derived at construction:
        sizes:   tokens per rank, ``len == sp_size``, sizes differ by at most 1.
        offsets: start token of each rank's shard, ``len == sp_size + 1`` (last = seq_len).
        local_size / local_offset / local_slice: this rank's shard.
    """

    seq_len: int
    sp_size: int
    sp_rank: int
    sizes: tuple[int, ...] = field(init=False)
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.sp_size < 1:
            raise ValueError(f"SequenceShardPlan: sp_size must be >= 1 (parallel.sp), got {self.sp_size}")
        if not 0 <= self.sp_rank < self.sp_size:
            raise ValueError(f"SequenceShardPlan: sp_rank {self.sp_rank} not in [0, {self.sp_size})")
        if self.seq_len < 1:
            raise ValueError(f"SequenceShardPlan: seq_len must be >= 1, got {self.seq_len}")
        sizes = split_sizes(self.seq_len, self.sp_size)
        object.__setattr__(self, "sizes", tuple(sizes))
        object.__setattr__(self, "offsets", _offsets(sizes))

    @property
    def local_size(self) -> int:
        return self.sizes[self.sp_rank]

    @property
    def local_offset(self) -> int:
        return self.offsets[self.sp_rank]

    @property
    def local_slice(self) -> slice:
        return slice(self.local_offset, self.local_offset + self.local_size)

    @property
    def is_even(self) -> bool:
        """True when every rank owns the same number of tokens."""
        return self.seq_len % self.sp_size == 0

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a full-sequence tensor: a view (``narrow``), no copy.

        ``x``: ``[..., S, ...]`` with ``S == seq_len`` at ``dim``. Returns ``[..., S_local, ...]``.
        """
        if self.sp_size == 1:
            return x
        return x.narrow(dim, self.local_offset, self.local_size)

    def gather(
        self, local_x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1
    ) -> torch.Tensor:
        """All-gather the shards of every SP rank back into the full sequence (a collective).

        ``local_x``: ``[..., S_local, ...]`` (this rank's shard at ``dim``); ``group``: the SP
        process group (``None`` = default group; ignored when ``sp_size == 1``). Returns
        ``[..., S, ...]`` with shards in rank order. Uneven shards are zero-padded to the largest
        shard for the exchange and trimmed afterwards, so it works on gloo and NCCL alike.
        Called once per forward (before unpatchify), so the extra concat copy is not on a hot path.
        """
        if self.sp_size == 1:
            return local_x
        dim = dim % local_x.dim()
        max_size = self.sizes[0]
        send = local_x.contiguous()
        if self.local_size < max_size:
            pad_shape = list(local_x.shape)
            pad_shape[dim] = max_size - self.local_size
            send = torch.cat([send, send.new_zeros(pad_shape)], dim=dim)
        pieces = [torch.empty_like(send) for _ in range(self.sp_size)]
        dist.all_gather(pieces, send, group=group)
        if not self.is_even:
            pieces = [piece.narrow(dim, 0, size) for piece, size in zip(pieces, self.sizes, strict=True)]
        return torch.cat(pieces, dim=dim)
