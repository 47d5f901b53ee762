"""Video Sparse Attention (VSA): tile metadata, tile/untile, the plain-PyTorch reference, the backend.

Semantics follow DESIGN.md section 6 (FastVideo VSA compatible). The model keeps tokens in compact
TILE ORDER (tile t owns positions [tile_offsets[t], tile_offsets[t+1]), no pad slots); the padded
layout (each tile owns ``prod(tile)`` slots, real tokens first) exists only for kernels that want it.
Legend: B batch, N heads, S tokens, T tiles (``num_tiles``), K selected tiles (``topk``), D head dim.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch
from tessera.attention.registry import Backend, register_backend, triton_kernel_problem

VSA_TILE = (4, 4, 4)  # tokens per tile along (frames, height, width): 64, FastVideo's
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _ReferenceTable:
    """A ``VSAMetadata`` table built on first read: every such table of the grid at once, moved to the metadata's
    device and kept in its ``_reference`` dict."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, metadata: VSAMetadata | None, owner: type | None = None):
        if metadata is None:
            return self
        if not metadata._reference:
            tables = _index_tables(metadata.grid, metadata.tile_size)
            names = [name for name, attr in vars(type(metadata)).items() if isinstance(attr, _ReferenceTable)]
            metadata._reference.update({name: tables[name].to(metadata.device) for name in names})
        return metadata._reference[self.name]


def on_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An index table on ``device``: as is when it lives there, else an asynchronous copy (from pinned host memory:
    ordered on the current stream, and a copy a CUDA graph captures). How VSA's host tables reach the device."""
    return index if index.device == device else index.to(device, non_blocking=True)


@dataclass(eq=False)
class VSAMetadata:
    """Per-request VSA index tables for one grid, sparsity and device (built once, reused by all steps).

    Built eagerly on the host, pinned when ``device`` is CUDA: the token order and its inverse (the DiT copies each
    in once per forward, to permute its tokens in and out) and the tile offsets (a ``VSAAttention`` call copies them
    in for its kernels). The copies are asynchronous, a CUDA graph captures them, and they are dropped after use, so
    between calls, through the FFN's memory peak, a request holds no table on its device. The tables only
    the plain-PyTorch reference and tile/untile read (``variable_block_sizes``, ``token_tile_ids``,
    ``non_pad_index``, ``untile_combined_index``) are built on first use and kept, so the Triton path holds none of
    them (they took 1 MB of a 1.3B-480p forward's peak). ``tile_buf`` is the cached
    padded buffer used by :func:`tile`.
    """

    grid: tuple[int, int, int]  # (T, H, W) token grid after patchify
    tile_size: tuple[int, int, int]
    num_tiles_per_axis: tuple[int, int, int]
    num_tiles: int
    total_seq_length: int
    tile_partition_indices: torch.Tensor  # int64 [S], host: tile-order position -> raster token index
    reverse_tile_partition_indices: torch.Tensor  # int64 [S], host: raster token index -> tile-order position
    tile_offsets_host: torch.Tensor  # int32 [T + 1], host: cumulative tile sizes, compact tile-order layout
    topk: int
    sparsity: float
    device: torch.device
    tile_buf: torch.Tensor | None = field(default=None, repr=False)
    _reference: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def tile_offsets(self) -> torch.Tensor:
        """``tile_offsets_host`` on ``device``, kept once read (benchmarks, tests and the kernels' direct callers; a
        ``VSAAttention`` call copies in its own, so a request holds no table on the device between calls)."""
        return self.tile_offsets_host.to(self.device)

    @property
    def tile_volume(self) -> int:
        """Slots per tile in the padded layout (64 for 4x4x4 tiles)."""
        return math.prod(self.tile_size)

    # Built on first read (all four at once): only the plain-PyTorch reference and tile/untile read them.
    variable_block_sizes = _ReferenceTable()  # int32 [T]: real tokens per tile
    token_tile_ids = _ReferenceTable()  # int64 [S]: tile-order position -> tile id
    non_pad_index = _ReferenceTable()  # int64 [S]: tile-order position -> padded slot
    untile_combined_index = _ReferenceTable()  # int64 [S]: raster token -> padded slot


def vsa_topk(sparsity: float, num_tiles: int) -> int:
    """``clamp(ceil((1 - sparsity) * num_tiles), 1, num_tiles)`` in exact rational arithmetic.

    ``Fraction(str(x))`` takes the shortest decimal repr, so 0.95 is exactly 19/20 (a float product
    would give ceil(72.00000000000001) = 73 for 1,440 tiles).
    """
    keep = (1 - Fraction(str(sparsity))) * num_tiles
    return max(1, min(num_tiles, -(-keep.numerator // keep.denominator)))


def _validate(grid_thw: tuple[int, int, int], sparsity: float, tile: tuple[int, int, int]) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"attention.sparsity must be a number in [0, 1), got {sparsity!r}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(
            f"attention.sparsity must lie in [0, 1), got {sparsity!r}; use e.g. attention.sparsity=0.9 "
            "(1 would keep no tiles; for dense attention set attention.backend=dense)"
        )
    if len(tile) != 3 or any(int(t) != t or t < 1 for t in tile):
        raise ValueError(f"VSA tile must be three positive ints, got {tile!r}")
    if len(grid_thw) != 3 or any(int(g) != g or g < 1 for g in grid_thw):
        raise ValueError(f"VSA grid (T, H, W) must be three positive ints, got {grid_thw!r}")
    if any(g < t for g, t in zip(grid_thw, tile, strict=True)):
        raise ValueError(
            f"VSA needs a token grid (T, H, W) of at least one tile {tuple(tile)} on every axis, got "
            f"{tuple(grid_thw)}; use more num_frames / a larger height or width, or attention.backend=dense"
        )


def build_vsa_metadata(
    grid_thw: tuple[int, int, int],
    sparsity: float,
    device: torch.device | str,
    tile: tuple[int, int, int] = VSA_TILE,
) -> VSAMetadata:
    """Build the tile-order index tables for a ``(T, H, W)`` token grid (the padded layout's on first use).

    Vectorised: the 14B-720p grid (21, 45, 80) builds in milliseconds. Raises ``ValueError`` for a
    sparsity outside [0, 1) or a grid smaller than one tile on any axis.
    """
    _validate(grid_thw, sparsity, tile)
    grid = tuple(int(g) for g in grid_thw)
    tile = tuple(int(t) for t in tile)
    tables = _index_tables(grid, tile)
    num_tiles_per_axis = tuple(-(-g // t) for g, t in zip(grid, tile, strict=True))
    device = torch.device(device)
    host = (tables["tile_partition_indices"], tables["reverse_tile_partition_indices"], tables["tile_offsets"])
    if device.type == "cuda":  # pinned: the copies to the device are asynchronous and graph-capturable
        host = tuple(t.pin_memory() for t in host)
    order, inverse, offsets = host
    return VSAMetadata(
        grid=grid,
        tile_size=tile,
        num_tiles_per_axis=num_tiles_per_axis,
        num_tiles=math.prod(num_tiles_per_axis),
        total_seq_length=math.prod(grid),
        tile_partition_indices=order,
        reverse_tile_partition_indices=inverse,
        tile_offsets_host=offsets,
        topk=vsa_topk(sparsity, math.prod(num_tiles_per_axis)),
        sparsity=float(sparsity),
        device=device,
    )


def _index_tables(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Every index table of a grid, on the CPU (see ``VSAMetadata`` for their meanings)."""
    T, H, W = grid
    a, b, c = tile
    num_t, num_h, num_w = -(-T // a), -(-H // b), -(-W // c)
    num_tiles = num_t * num_h * num_w
    S = T * H * W

    # Per raster token: its coordinates, tile id and raster rank among its tile's real tokens.
    raster = torch.arange(S, dtype=torch.int64)
    t, h, w = raster // (H * W), (raster // W) % H, raster % W
    tile_id = ((t // a) * num_h + h // b) * num_w + w // c
    ext_h = torch.clamp(H - (h // b) * b, max=b)  # real extent of this token's tile along h
    ext_w = torch.clamp(W - (w // c) * c, max=c)
    local = (t % a) * ext_h * ext_w + (h % b) * ext_w + (w % c)

    def _extents(n: int, size: int, num: int) -> torch.Tensor:
        return torch.clamp(n - torch.arange(num, dtype=torch.int64) * size, max=size)

    sizes = (
        _extents(T, a, num_t)[:, None, None] * _extents(H, b, num_h)[None, :, None] * _extents(W, c, num_w)
    ).reshape(-1)
    offsets = torch.zeros(num_tiles + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)

    reverse = offsets[tile_id] + local  # raster -> tile-order position
    forward = torch.empty_like(reverse).scatter_(0, reverse, raster)  # tile-order position -> raster
    combined = tile_id * (a * b * c) + local  # raster -> padded slot
    return {
        "tile_partition_indices": forward,
        "reverse_tile_partition_indices": reverse,
        "variable_block_sizes": sizes.to(torch.int32),
        "tile_offsets": offsets.to(torch.int32),
        "token_tile_ids": tile_id[forward],
        "non_pad_index": combined[forward],
        "untile_combined_index": combined,
    }


def tile(x_SD: torch.Tensor, metadata: VSAMetadata) -> torch.Tensor:
    """Scatter RASTER-order tokens ``x [..., S, D]`` into the padded tile layout ``[..., T * 64, D]``.

    Writes into (and returns) the cached ``metadata.tile_buf``, reallocated (zeroed) only when the
    shape, dtype or device changes; pad slots are never written, so they stay zero. The returned tensor
    is overwritten by the next ``tile`` call on the same metadata.
    """
    shape = (*x_SD.shape[:-2], metadata.num_tiles * metadata.tile_volume, x_SD.shape[-1])
    buf = metadata.tile_buf
    if buf is None or buf.shape != shape or buf.dtype != x_SD.dtype or buf.device != x_SD.device:
        buf = torch.zeros(shape, dtype=x_SD.dtype, device=x_SD.device)
        metadata.tile_buf = buf
    return buf.index_copy_(-2, metadata.untile_combined_index, x_SD)


def untile(x_padded: torch.Tensor, metadata: VSAMetadata) -> torch.Tensor:
    """Padded tile layout ``[..., T * 64, D]`` -> RASTER order ``[..., S, D]`` in one gather."""
    return x_padded.index_select(-2, metadata.untile_combined_index)


def _tile_means(x_BNSD: torch.Tensor, metadata: VSAMetadata) -> torch.Tensor:
    """Per-tile mean over real tokens, accumulated in fp32 and rounded to ``x.dtype``: [B, N, T, D]."""
    B, N, _, D = x_BNSD.shape
    # Deterministic segment sum: scatter into zero-padded tiles, then reduce each tile's slots.
    padded = x_BNSD.new_zeros(B, N, metadata.num_tiles * metadata.tile_volume, D)
    padded.index_copy_(2, metadata.non_pad_index, x_BNSD)
    sums = padded.view(B, N, metadata.num_tiles, metadata.tile_volume, D).sum(3, dtype=torch.float32)
    return (sums / metadata.variable_block_sizes[:, None].to(torch.float32)).to(x_BNSD.dtype)


def vsa_select_blocks(
    q_BNSD: torch.Tensor, k_BNSD: torch.Tensor, v_BNSD: torch.Tensor, metadata: VSAMetadata
) -> tuple[torch.Tensor, torch.Tensor]:
    """VSA coarse stage on compact tile-order inputs ``[B, N, S, D]``.

    Returns ``block_index_BNTK`` (int32 [B, N, T, topk], selected key tiles per query tile, sorted
    ascending; ties in the block scores go to the lower tile index) and ``coarse_BNTD`` (float32
    [B, N, T, D], the per-query-TILE coarse output: softmax over all key tiles of ``q_c k_c^T / sqrt(D)``
    times ``v_c``; not broadcast to tokens). Tile means are rounded to the input dtype first.
    """
    q_c, k_c, v_c = (_tile_means(x, metadata) for x in (q_BNSD, k_BNSD, v_BNSD))
    return select_from_tile_means(q_c, k_c, v_c, metadata.topk)


def select_from_tile_means(
    q_c_BNTD: torch.Tensor,
    k_c_BNTD: torch.Tensor,
    v_c_BNTD: torch.Tensor,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scores, top-k key tiles and the coarse output from per-tile means (see vsa_select_blocks)."""
    scale = 1.0 / math.sqrt(q_c_BNTD.shape[-1])
    q_c, k_c, v_c = q_c_BNTD.float(), k_c_BNTD.float(), v_c_BNTD.float()
    scores_BNTT = torch.matmul(q_c, k_c.transpose(-1, -2)) * scale
    coarse_BNTD = torch.matmul(torch.softmax(scores_BNTT, dim=-1), v_c)
    block_index_BNTK = _topk_lower_index_wins(scores_BNTT, topk)
    return block_index_BNTK, coarse_BNTD


def _topk_lower_index_wins(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the ``topk`` largest fp32 scores per row, ties to the lower index: int32 [..., topk], ascending.

    Equals a stable descending sort, at the price of one fp32 ``topk`` (4 radix passes) and a few elementwise
    passes: the top-k values give the k-th largest score (the threshold); every score above it is selected, and
    of the scores equal to it (-0.0 == +0.0) the lowest-indexed ones fill the remaining slots. A cumulative
    count then places each selected index in its ascending slot.
    """
    num_tiles = scores.shape[-1]
    # NaN scores (NaN latents, caught after the loop) rank lowest: every slot still gets a real tile index, where NaN
    # thresholds selected nothing and the slots kept torch.empty's garbage (an out-of-bounds gather).
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    threshold = torch.topk(scores, topk, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = scores > threshold
    tied = scores == threshold
    slots_left = topk - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
    selected = above | (tied & (tied.cumsum(dim=-1, dtype=torch.int32) <= slots_left))
    slot = (selected.cumsum(dim=-1) - 1).masked_fill_(~selected, topk)  # unselected -> spill column `topk`
    index = torch.empty(*scores.shape[:-1], topk + 1, device=scores.device, dtype=torch.int32)
    tiles = torch.arange(num_tiles, device=scores.device, dtype=torch.int32).expand_as(scores)
    return index.scatter_(-1, slot, tiles)[..., :topk].contiguous()


def vsa_attention_reference(
    q_BNSD: torch.Tensor,
    k_BNSD: torch.Tensor,
    v_BNSD: torch.Tensor,
    gate_BNSD: torch.Tensor | None,
    metadata: VSAMetadata,
) -> torch.Tensor:
    """The VSA spec in plain PyTorch (any device; materialises a [B, N, S, S] mask, small shapes only).

    Inputs ``[B, N, S, D]`` in compact tile order, one dtype. Returns ``fine + gate * coarse`` in the
    input dtype, computed in fp32. ``fine``: exact softmax attention (scale 1/sqrt(D)) of each query
    over the real tokens of its tile's selected key tiles. ``coarse``: the per-tile coarse output
    broadcast to the tile's tokens; ``gate_BNSD=None`` means no coarse term.
    """
    block_index_BNTK, coarse_BNTD = vsa_select_blocks(q_BNSD, k_BNSD, v_BNSD, metadata)
    B, N, _, D = q_BNSD.shape
    tid = metadata.token_tile_ids
    selected_BNTT = torch.zeros(
        B, N, metadata.num_tiles, metadata.num_tiles, dtype=torch.bool, device=q_BNSD.device
    )
    selected_BNTT.scatter_(-1, block_index_BNTK.long(), True)
    allowed_BNSS = selected_BNTT[:, :, tid][:, :, :, tid]
    scores = torch.matmul(q_BNSD.float(), k_BNSD.float().transpose(-1, -2)) / math.sqrt(D)
    probs = torch.softmax(scores.masked_fill(~allowed_BNSS, float("-inf")), dim=-1)
    out = torch.matmul(probs, v_BNSD.float())
    if gate_BNSD is not None:
        out = out + gate_BNSD.float() * coarse_BNTD[:, :, tid]
    return out.to(q_BNSD.dtype)


def vsa_check_supported(dtype: torch.dtype, head_dim: int, device: torch.device | str) -> str | None:
    """Return why VSA cannot run with these settings, or ``None`` when it can (checked once per plan)."""
    # tl.dot needs K >= 16 and power-of-two block shapes; larger heads exceed shared memory.
    return triton_kernel_problem("VSA", dtype, head_dim, device, dtypes=_SUPPORTED_DTYPES,
                                 head_dims=(16, 32, 64, 128, 256))


class VSAAttention:
    """VSA backend over a compact tile-order sequence: ``(q, k, v, gate) [B, N, S, D] -> out [B, N, S, D]``.

    ``impl``: ``"torch"`` = :func:`vsa_attention_reference`; ``"triton"`` = four Triton launches: tile means
    of q, k, v; block scores + coarse output; top-k; the fine stage with gate * coarse fused into its
    epilogue. ``"auto"`` = triton when ``metadata.device`` is CUDA, else torch. Resolved once here, never per call.
    ``fine_kernel`` (triton only): ``"gluon"`` the Gluon fine kernel where a call's layout allows it (Hopper, 16-bit,
    D = 128), ``"triton"`` always the Triton kernel, ``"auto"`` gluon when ``gluon_fine_available`` for the metadata's
    device and the given ``dtype``/``head_dim``. Resolved once into ``self.kernel`` (reported), never per call.
    ``consume_q=True`` (triton only) lets the output overwrite q's buffer: saves one [B, N, S, D] allocation
    when the caller never reads q again (the DiT's self-attention); q then holds the output afterwards.
    """

    name: str = "vsa"
    uses_gate: bool = True
    writes_out: bool = True  # takes out_BNSD= (AttentionBackend)

    def __init__(
        self,
        metadata: VSAMetadata,
        impl: Literal["auto", "torch", "triton"] = "auto",
        consume_q: bool = False,
        *,
        fine_kernel: Literal["auto", "gluon", "triton"] = "auto",
        dtype: torch.dtype | None = None,
        head_dim: int | None = None,
    ) -> None:
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"VSAAttention impl must be 'auto', 'torch' or 'triton', got {impl!r}")
        if fine_kernel not in ("auto", "gluon", "triton"):
            raise ValueError(f"VSAAttention fine_kernel must be 'auto', 'gluon' or 'triton', got {fine_kernel!r}")
        if impl == "auto":
            impl = "triton" if metadata.device.type == "cuda" else "torch"
        self.metadata = metadata
        self.impl = impl
        self.consume_q = consume_q and impl == "triton"
        self._fine = None
        self.kernel = "torch"  # what runs the fine stage: "torch" (reference), "triton" or "gluon"; reported
        if impl == "triton":
            from tessera.attention.vsa_coarse_triton import vsa_select_from_means, vsa_tile_means
            from tessera.attention.vsa_triton import gluon_fine_available, vsa_fine_attention

            self._fine, self._select, self._tile_means = vsa_fine_attention, vsa_select_from_means, vsa_tile_means
            gluon = fine_kernel != "triton" and gluon_fine_available(metadata.device, dtype, head_dim)
            if fine_kernel == "gluon" and not gluon:
                raise ValueError(
                    f"VSAAttention fine_kernel='gluon' needs a Hopper GPU, 16-bit and D = 128 (device "
                    f"{metadata.device}, dtype {dtype}, head dim {head_dim}); use fine_kernel='auto' or 'triton'"
                )
            self.kernel = "gluon" if gluon else "triton"

    def __call__(
        self,
        q_BNSD: torch.Tensor,
        k_BNSD: torch.Tensor,
        v_BNSD: torch.Tensor,
        gate_BNSD: torch.Tensor | None,
        out_BNSD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._fine is None:
            result = vsa_attention_reference(q_BNSD, k_BNSD, v_BNSD, gate_BNSD, self.metadata)
            return result if out_BNSD is None else out_BNSD.copy_(result)
        m = self.metadata
        # this call's own copy of the tile offsets (2.5 KB at 1.3B-480p): none lives on the device between calls,
        # so a VSA forward's memory peak (the FFN's) holds nothing a dense one does not
        offsets = on_device(m.tile_offsets_host, q_BNSD.device)
        q_c, k_c, v_c = self._tile_means((q_BNSD, k_BNSD, v_BNSD), offsets, m.num_tiles)
        block_index_BNTK, coarse_BNTD, key_spans = self._select(q_c, k_c, v_c, m.topk, offsets)
        return self._fine(
            q_BNSD,
            k_BNSD,
            v_BNSD,
            offsets,
            block_index_BNTK,
            coarse_BNTD if gate_BNSD is not None else None,
            gate_BNSD,
            out_BNSD=out_BNSD if out_BNSD is not None else (q_BNSD if self.consume_q else None),
            key_spans=key_spans,
            gluon=self.kernel == "gluon",
        )

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"VSAAttention(grid={m.grid}, sparsity={m.sparsity}, topk={m.topk}/{m.num_tiles}, "
            f"impl={self.impl!r}, kernel={self.kernel!r})"
        )


def _vsa_backend_check(
    dtype: torch.dtype, head_dim: int, device: torch.device, grid_thw: tuple[int, int, int]
) -> str | None:
    if any(g < t for g, t in zip(grid_thw, VSA_TILE, strict=True)):
        return (
            f"the token grid {tuple(grid_thw)} (frames, height, width after patchify) is smaller than one VSA tile "
            f"{VSA_TILE}; raise num_frames/height/width (>= 13 frames, >= 64 px)"
        )
    return vsa_check_supported(dtype, head_dim, device)


def _vsa_auto_problem(device: torch.device) -> str | None:
    # On CPU VSA runs its plain-PyTorch reference, which materialises [B, N, S, S] scores: fine for tests and
    # small grids (attention.backend=vsa forces it), not a sensible automatic choice.
    if torch.device(device).type != "cuda":
        return "VSA's Triton kernel needs a CUDA GPU (attention.backend=vsa runs the O(S^2) CPU reference)"
    return None


VSA_BACKEND = register_backend(Backend(
    name="vsa",
    sparse=True,
    uses_gate=VSAAttention.uses_gate,
    check_supported=_vsa_backend_check,
    auto_problem=_vsa_auto_problem,
    build_metadata=build_vsa_metadata,
    token_order=lambda m: (m.tile_partition_indices, m.reverse_tile_partition_indices),  # host tables
    # consume_q: q is dead after the DiT's self-attention, so the output may overwrite it
    build=lambda metadata, dtype, head_dim: VSAAttention(metadata, consume_q=True, dtype=dtype, head_dim=head_dim),
    # vsa_attention_reference: fp32 scores, their masked copy and the probabilities, and a bool mask: [B, N, S, S]
    reference_bytes=lambda batch, heads, tokens, head_dim: batch * heads * tokens * tokens * (3 * 4 + 1),
))
