"""Ulysses sequence-parallel self-attention: sequence shards in, head slices through the kernel, and back.

``UlyssesAttention`` wraps an attention backend and implements the model-side ``SelfAttention``
protocol: ``attn(q_BSND, k_BSND, v_BSND, gate_BSND | None) -> out_BSND`` on this rank's token shard
with all heads. q, k, v (and the gate) travel in ONE ``all_to_all_single`` to ``[B, N_local, S, D]``
(full sequence, this rank's head slice); the backend runs; ONE ``all_to_all_single`` brings the output
back. Token shards and head slices may both be uneven (``split_sizes``); a rank may own zero heads.

Legend: B batch, S tokens, N heads, D head dim, T stacked inputs (q, k, v[, gate]); ``local_*`` = shard.

Every chunk of both exchanges is TOKEN-MAJOR (``[tokens, T, B, heads, D]``), so the chunks a rank receives,
concatenated in rank order, are already the full sequence in order: the receive buffer is ``[S, T, B, N_local,
D]`` and the backend reads q, k, v, gate as strided views of it, and writes its output straight into the
return send buffer ``[S, B, N_local, D]`` (backends with ``writes_out``; others' output is copied there). Two
copies per call remain, each one pass over the data in 8-byte words (``_copy_rows``):
  1. pack: q, k, v, gate -> the send buffer, grouped by destination rank (its head slice), because
     ``all_to_all_single`` needs each destination's chunk contiguous;
  2. unpack: the returned chunks (grouped by source rank = head slice) -> ``[B, S_local, N, D]``.
(Session 4's layout had two more, an unpack of the receive buffer and a pack of the output.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tessera.parallel.sequence import SequenceShardPlan, split_sizes

if TYPE_CHECKING:
    from tessera.attention.interface import AttentionBackend
    from tessera.parallel.mesh import ParallelMesh

__all__ = ["UlyssesAttention"]


def _as_words(x: torch.Tensor) -> torch.Tensor | None:
    """x's bytes viewed as int64 words when its rows allow it (D contiguous, every stride and the offset whole
    words), else None."""
    size = x.element_size()
    if size >= 8 or x.stride(-1) != 1 or (x.shape[-1] * size) % 8 or x.storage_offset() * size % 8:
        return None
    if any(stride * size % 8 for stride in x.stride()[:-1]):
        return None
    return x.view(torch.int64)


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, as 8-byte words when both have dst's dtype and word-aligned rows: a permuted copy of
    16-bit rows then moves a quarter of the elements (the bytes are the same). A dtype change copies values."""
    if dst.dtype == src.dtype:
        dst_words, src_words = _as_words(dst), _as_words(src)
        if dst_words is not None and src_words is not None:
            dst_words.copy_(src_words)
            return
    dst.copy_(src)


def _offsets(sizes: tuple[int, ...]) -> tuple[int, ...]:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return tuple(offsets)


class UlyssesAttention:
    """Sequence-parallel wrapper of one attention backend (one instance per block and request).

    ``__call__(q_BSND, k_BSND, v_BSND, gate_BSND=None) -> out_BSND``:
        q, k, v, gate: ``[B, S_local, N, D]``, this rank's token shard (``seq_plan.local_size``),
            all ``num_heads`` heads; same dtype and device (strided views are fine). ``gate_BSND``
            is used only when ``backend.uses_gate`` (ignored otherwise); it travels in q's dtype.
        returns ``[B, S_local, N, D]`` in the backend's output dtype.
    The backend sees ``[B, N_local, S, D]`` with the full sequence in ``seq_plan`` order (with
    ``sp_size > 1`` contiguous; with ``sp_size == 1`` strided transposed views, no copies).
    """

    def __init__(
        self,
        backend: AttentionBackend,
        sp_group: dist.ProcessGroup | None,
        sp_size: int,
        sp_rank: int,
        seq_plan: SequenceShardPlan,
        num_heads: int,
    ) -> None:
        if num_heads < 1:
            raise ValueError(f"UlyssesAttention: num_heads must be >= 1, got {num_heads}")
        if (seq_plan.sp_size, seq_plan.sp_rank) != (sp_size, sp_rank):
            raise ValueError(
                f"UlyssesAttention: seq_plan is for sp_size={seq_plan.sp_size}, sp_rank={seq_plan.sp_rank} "
                f"but parallel.sp={sp_size}, sp_rank={sp_rank}; build the plan from the same mesh"
            )
        if sp_size > 1:
            if not dist.is_initialized():
                raise ValueError(f"parallel.sp={sp_size} needs an initialised process group")
            group_size, group_rank = dist.get_world_size(sp_group), dist.get_rank(sp_group)
            if (group_size, group_rank) != (sp_size, sp_rank):
                raise ValueError(
                    f"UlyssesAttention: sp_group has size {group_size} and this rank is {group_rank} in it, "
                    f"but parallel.sp={sp_size}, sp_rank={sp_rank}; pass mesh.sp_group"
                )
        self.backend = backend
        self.name: str = backend.name
        self.uses_gate: bool = bool(backend.uses_gate)
        self.sp_group = sp_group
        self.sp_size = sp_size
        self.sp_rank = sp_rank
        self.seq_plan = seq_plan
        self.num_heads = num_heads
        # Uneven head slices: with sp > num_heads trailing ranks own zero heads and only relay tokens.
        self.head_sizes: tuple[int, ...] = tuple(split_sizes(num_heads, sp_size))
        self.head_offsets: tuple[int, ...] = _offsets(self.head_sizes)
        self.num_local_heads: int = self.head_sizes[sp_rank]
        self._even_heads = num_heads % sp_size == 0

    @classmethod
    def from_mesh(
        cls, backend: AttentionBackend, mesh: ParallelMesh, seq_plan: SequenceShardPlan, num_heads: int
    ) -> UlyssesAttention:
        """Build over ``mesh``'s SP axis."""
        return cls(backend, mesh.sp_group, mesh.sp_size, mesh.sp_rank, seq_plan, num_heads)

    def __repr__(self) -> str:
        return (
            f"UlyssesAttention(backend={self.backend!r}, sp={self.sp_rank}/{self.sp_size}, "
            f"heads={self.num_local_heads}/{self.num_heads})"
        )

    def __call__(
        self,
        q_BSND: torch.Tensor,
        k_BSND: torch.Tensor,
        v_BSND: torch.Tensor,
        gate_BSND: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.uses_gate:
            gate_BSND = None
        if self.sp_size == 1:
            gate_BNSD = None if gate_BSND is None else gate_BSND.transpose(1, 2)
            q_BNSD, k_BNSD, v_BNSD = (x.transpose(1, 2) for x in (q_BSND, k_BSND, v_BSND))
            out_BNSD = self.backend(q_BNSD, k_BNSD, v_BNSD, gate_BNSD)
            return out_BNSD.transpose(1, 2)

        inputs = (q_BSND, k_BSND, v_BSND) if gate_BSND is None else (q_BSND, k_BSND, v_BSND, gate_BSND)
        B, S_local, N, D = q_BSND.shape
        T, S, n = len(inputs), self.seq_plan.seq_len, self.num_local_heads

        # Forward exchange: token shard x all heads -> full sequence x local heads; the receive buffer is
        # [S, T, B, n, D] in sequence order (token-major chunks), read in place through strided views.
        send = self._pack_by_heads(inputs, B, S_local, D)
        send_splits = [T * B * D * S_local * h for h in self.head_sizes]
        recv_splits = [T * B * D * s * n for s in self.seq_plan.sizes]
        recv = send.new_empty(sum(recv_splits))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.sp_group)
        recv_STBND = recv.view(S, T, B, n, D)
        local_BNSD = [recv_STBND[:, t].permute(1, 2, 0, 3) for t in range(T)]

        # The backend's output goes into the return send buffer [S, B, n, D]: token shard s's chunk is contiguous.
        send_out = recv.new_empty(S * B * n * D)
        out_BNSD = send_out.view(S, B, n, D).permute(1, 2, 0, 3)
        if n > 0:
            gate_local = local_BNSD[3] if T == 4 else None
            if getattr(self.backend, "writes_out", False):
                self.backend(*local_BNSD[:3], gate_local, out_BNSD=out_BNSD)
            else:
                self._pack_output(out_BNSD, self.backend(*local_BNSD[:3], gate_local))

        # Backward exchange: full sequence x local heads -> token shard x all heads.
        send_splits = [B * D * s * n for s in self.seq_plan.sizes]
        recv_splits = [B * D * S_local * h for h in self.head_sizes]
        recv_out = send_out.new_empty(sum(recv_splits))
        dist.all_to_all_single(recv_out, send_out, recv_splits, send_splits, group=self.sp_group)
        return self._unpack_by_heads(recv_out, B, S_local, N, D)

    # -- packing: each is exactly one pass over the data ------------------------------------------

    def _pack_by_heads(self, inputs: tuple[torch.Tensor, ...], B: int, S_local: int, D: int) -> torch.Tensor:
        """``T x [B, S_local, N, D]`` -> 1-D buffer; chunk for rank r is ``[S_local, T, B, N_r, D]``."""
        T, sp = len(inputs), self.sp_size
        send = inputs[0].new_empty(T * B * S_local * self.num_heads * D)
        if self._even_heads:
            n = self.num_heads // sp
            send_rSTBND = send.view(sp, S_local, T, B, n, D)
            for t, x_BSND in enumerate(inputs):
                _copy_rows(send_rSTBND[:, :, t], x_BSND.unflatten(2, (sp, n)).permute(2, 1, 0, 3, 4))
            return send
        start = 0
        for r, n in enumerate(self.head_sizes):
            if n == 0:
                continue
            chunk_STBND = send[start : start + T * B * S_local * n * D].view(S_local, T, B, n, D)
            heads = slice(self.head_offsets[r], self.head_offsets[r + 1])
            for t, x_BSND in enumerate(inputs):
                _copy_rows(chunk_STBND[:, t], x_BSND[:, :, heads].transpose(0, 1))
            start += T * B * S_local * n * D
        return send

    def _pack_output(self, out_BNSD: torch.Tensor, result_BNSD: torch.Tensor) -> None:
        """A backend without ``writes_out``: its result -> the return send buffer (a third copy)."""
        _copy_rows(out_BNSD, result_BNSD)

    def _unpack_by_heads(self, recv: torch.Tensor, B: int, S_local: int, N: int, D: int) -> torch.Tensor:
        """1-D buffer of chunks ``[S_local, B, N_r, D]`` per source rank r -> ``[B, S_local, N, D]``."""
        sp = self.sp_size
        out_BSND = recv.new_empty((B, S_local, N, D))
        if self._even_heads:
            n = N // sp
            _copy_rows(out_BSND.view(B, S_local, sp, n, D), recv.view(sp, S_local, B, n, D).permute(2, 1, 0, 3, 4))
            return out_BSND
        start = 0
        for r, n in enumerate(self.head_sizes):
            chunk_SBND = recv[start : start + B * S_local * n * D].view(S_local, B, n, D)
            _copy_rows(out_BSND[:, :, self.head_offsets[r] : self.head_offsets[r + 1]], chunk_SBND.transpose(0, 1))
            start += B * S_local * n * D
        return out_BSND
