"""Triton kernel for the fine stage of Video Sparse Attention (VSA), with the gated coarse term fused.

Layers: private `@triton.jit` kernel -> torch op `tessera::vsa_fine` (with a fake impl for torch.compile)
-> public `vsa_fine_attention`. Runs on CPU under `TRITON_INTERPRET=1` (set before importing triton).
Legend: B batch, N heads, S tokens (compact tile order), T tiles, K selected tiles per query tile, D head dim.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TILE_TOKENS = 64  # DESIGN tile (4, 4, 4) = 4 * 4 * 4 tokens: the most a compact tile can own
_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e)), folded into the softmax scale
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _vsa_fine_kernel(
    Q, K, V, OUT, GATE, COARSE,  # [B, N, S, D] with any (batch, head, token) strides, D contiguous
    stride_qb, stride_qn, stride_qs,  # q, k, v, out and gate share one layout (checked by the caller)
    TILE_OFFSETS,  # int32 [T + 1]
    BLOCK_INDEX,  # int32 [B*N, T, topk]
    COARSE_STRIDE_BH,  # elements between consecutive (b, n) rows of COARSE [B*N, T, D]
    num_heads, num_tiles, topk,
    qk_scale,  # log2(e) / sqrt(D): scores in the exp2 domain
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES_PER_ITER: tl.constexpr,  # 1 or 2 (autotuned on GPU)
    HAS_GATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong; bf16 products are exact in fp32
):
    tile_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    # int64 offsets: B*N*S*D exceeds 2**31 at 14B/720p with B=2
    head_off = (bh // num_heads) * stride_qb + (bh % num_heads) * stride_qn

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_start = tl.load(TILE_OFFSETS + tile_q)
    q_end = tl.load(TILE_OFFSETS + tile_q + 1)
    rows = q_start + offs_m
    row_mask = rows < q_end
    io_offsets = head_off + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    q = tl.load(Q + io_offsets, mask=row_mask[:, None], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    index_row = BLOCK_INDEX + (bh * num_tiles + tile_q) * topk
    # TILES_PER_ITER selected key tiles per iteration share one online-softmax rescale of acc.
    for j in range(0, tl.cdiv(topk, TILES_PER_ITER)):
        tile_a = tl.load(index_row + j * TILES_PER_ITER)
        cols_a = tl.load(TILE_OFFSETS + tile_a) + offs_n
        mask_a = cols_a < tl.load(TILE_OFFSETS + tile_a + 1)  # keys past a tile's real tokens: never read
        kv_a = head_off + cols_a[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
        k_a = tl.load(K + kv_a, mask=mask_a[:, None], other=0.0)  # [BLOCK_N, D], rows contiguous
        if DOT_IN_FP32:
            k_a = k_a.to(tl.float32)
        s_a = tl.dot(q, tl.trans(k_a), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        s_a = tl.where(mask_a[None, :], s_a * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_a, 1))  # finite: every tile owns >= 1 real token
        if TILES_PER_ITER == 2:
            # topk may be odd: the last iteration's second tile is then empty (a tensor, for the interpreter)
            live_b = tl.full([BLOCK_N], j * 2 + 1, tl.int32) < topk
            tile_b = tl.load(index_row + tl.minimum(j * 2 + 1, topk - 1))  # in bounds; masked below if dead
            cols_b = tl.load(TILE_OFFSETS + tile_b) + offs_n
            mask_b = (cols_b < tl.load(TILE_OFFSETS + tile_b + 1)) & live_b
            kv_b = head_off + cols_b[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
            k_b = tl.load(K + kv_b, mask=mask_b[:, None], other=0.0)
            if DOT_IN_FP32:
                k_b = k_b.to(tl.float32)
            s_b = tl.dot(q, tl.trans(k_b), input_precision=INPUT_PRECISION)
            s_b = tl.where(mask_b[None, :], s_b * qk_scale, float("-inf"))
            m_new = tl.maximum(m_new, tl.max(s_b, 1))
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        p_a = tl.math.exp2(s_a - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p_a, 1)
        v_a = tl.load(V + kv_a, mask=mask_a[:, None], other=0.0)
        p_v = p_a.to(V.dtype.element_ty)  # P rounded to the value dtype, as on GPU
        if DOT_IN_FP32:
            p_v, v_a = p_v.to(tl.float32), v_a.to(tl.float32)
        acc = tl.dot(p_v, v_a, acc, input_precision=INPUT_PRECISION)
        if TILES_PER_ITER == 2:
            p_b = tl.math.exp2(s_b - m_new[:, None])
            l_i += tl.sum(p_b, 1)
            v_b = tl.load(V + kv_b, mask=mask_b[:, None], other=0.0)
            p_v = p_b.to(V.dtype.element_ty)
            if DOT_IN_FP32:
                p_v, v_b = p_v.to(tl.float32), v_b.to(tl.float32)
            acc = tl.dot(p_v, v_b, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    if HAS_GATE:
        gate = tl.load(GATE + io_offsets, mask=row_mask[:, None], other=0.0).to(tl.float32)
        coarse = tl.load(COARSE + bh * COARSE_STRIDE_BH + tile_q * HEAD_DIM + offs_d).to(tl.float32)
        out += gate * coarse[None, :]
    tl.store(OUT + io_offsets, out.to(OUT.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _tile_means_kernel(
    X, OUT,  # X [B, N, S, D] (any batch/head/token strides, D contiguous); OUT [B, N, T, D] contiguous
    stride_xb, stride_xn, stride_xs,
    TILE_OFFSETS,  # int32 [T + 1]
    num_heads, num_tiles,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    start = tl.load(TILE_OFFSETS + tile)
    end = tl.load(TILE_OFFSETS + tile + 1)
    rows = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = (bh // num_heads) * stride_xb + (bh % num_heads) * stride_xn
    offsets = base + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :]
    x = tl.load(X + offsets, mask=(rows < end)[:, None], other=0.0)
    mean = tl.sum(x.to(tl.float32), 0) / (end - start).to(tl.float32)  # fp32 accumulation, then rounded
    tl.store(OUT + (bh * num_tiles + tile) * HEAD_DIM + offs_d, mean.to(OUT.dtype.element_ty))


def _autotune_configs() -> list[triton.Config]:
    # 4 warps = one warpgroup = one 64-row wgmma tile (8 warps measured ~2x slower on H100 at 64 rows);
    # num_stages 3 won at both Wan shapes with one tile per iteration, 2 and 4 stay for other GPUs.
    return [
        triton.Config({"TILES_PER_ITER": tiles}, num_warps=4, num_stages=stages)
        for tiles in (1, 2)
        for stages in (2, 3, 4)
    ]


_vsa_fine_kernel_tuned = triton.autotune(configs=_autotune_configs(), key=["HEAD_DIM", "HAS_GATE", "topk"])(
    _vsa_fine_kernel
)


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_offsets: torch.Tensor,
    block_index: torch.Tensor, coarse: torch.Tensor | None, gate: torch.Tensor | None,
) -> torch.Tensor:
    batch, heads, _, head_dim = q.shape
    num_tiles, topk = block_index.shape[2], block_index.shape[3]
    out = torch.empty_like(q)  # same strides as q (dense), so a [B, S, N, D] caller gets its layout back
    has_gate = gate is not None and coarse is not None
    gate_arg = gate if has_gate else q  # never read when HAS_GATE is False
    coarse_arg = coarse if has_gate else q
    grid = (num_tiles, batch * heads)
    args = (q, k, v, out, gate_arg, coarse_arg, *q.stride()[:3], tile_offsets, block_index,
            num_tiles * head_dim, heads, num_tiles, topk, _LOG2E / math.sqrt(head_dim))
    interpret = _INTERPRET or not q.is_cuda
    dot_in_fp32 = interpret and q.dtype == torch.bfloat16
    meta = dict(HEAD_DIM=head_dim, BLOCK_M=_TILE_TOKENS, BLOCK_N=_TILE_TOKENS, HAS_GATE=has_gate,
                INPUT_PRECISION="ieee" if q.dtype == torch.float32 or dot_in_fp32 else "tf32",
                DOT_IN_FP32=dot_in_fp32)
    if interpret:
        # Both loop shapes get exercised by the CPU tests (topk 1..6): the 2-tile one, with and without
        # an empty second tile in the last iteration, and the 1-tile one when topk % 4 == 0.
        tiles_per_iter = 1 if topk % 4 == 0 else 2
        _vsa_fine_kernel[grid](*args, **meta, TILES_PER_ITER=tiles_per_iter, num_warps=4, num_stages=1)
    else:
        _vsa_fine_kernel_tuned[grid](*args, **meta)
    return out


def vsa_tile_means(x_BNSD: torch.Tensor, tile_offsets: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """Per-tile mean of x over each tile's real tokens: [B, N, T, D] in x's dtype (fp32 accumulation).

    x_BNSD: [B, N, S, D] in compact tile order, D contiguous (any batch/head/token strides).
    One read of x, no padded copy; equals ``attention.vsa._tile_means`` (the torch spec).
    """
    batch, heads, _, head_dim = x_BNSD.shape
    if x_BNSD.stride(-1) != 1:
        x_BNSD = x_BNSD.contiguous()
    out = torch.empty(batch, heads, num_tiles, head_dim, device=x_BNSD.device, dtype=x_BNSD.dtype)
    _tile_means_kernel[(num_tiles, batch * heads)](
        x_BNSD, out, *x_BNSD.stride()[:3], tile_offsets, heads, num_tiles,
        HEAD_DIM=head_dim, BLOCK_M=_TILE_TOKENS, num_warps=4,
    )
    return out


@torch.library.custom_op("tessera::vsa_fine", mutates_args=())
def _vsa_fine_op(
    q_BNSD: torch.Tensor, k_BNSD: torch.Tensor, v_BNSD: torch.Tensor, tile_offsets: torch.Tensor,
    block_index: torch.Tensor, coarse_BNTD: torch.Tensor | None, gate_BNSD: torch.Tensor | None,
) -> torch.Tensor:
    return _launch(q_BNSD, k_BNSD, v_BNSD, tile_offsets, block_index, coarse_BNTD, gate_BNSD)


@_vsa_fine_op.register_fake
def _vsa_fine_fake(q_BNSD, k_BNSD, v_BNSD, tile_offsets, block_index, coarse_BNTD, gate_BNSD):
    return torch.empty_like(q_BNSD)


def vsa_fine_attention(
    q_BNSD: torch.Tensor,
    k_BNSD: torch.Tensor,
    v_BNSD: torch.Tensor,
    tile_offsets: torch.Tensor,
    block_index: torch.Tensor,
    coarse_BNTD: torch.Tensor | None = None,
    gate_BNSD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse fine attention over compact tile order, plus the gated coarse term.

    q_BNSD, k_BNSD, v_BNSD: [B, N, S, D], one dtype of bf16/fp16/fp32, D a power of two in [16, 256];
        tokens in compact tile order (tile t owns [tile_offsets[t], tile_offsets[t+1])). Any batch/head/
        token strides with D contiguous (e.g. a [B, S, N, D] tensor viewed as BNSD): read in place when
        q, k, v (and gate) share one layout, else copied to contiguous.
    tile_offsets: int32 [T + 1], tile_offsets[0] == 0, tile_offsets[T] == S, each tile 1..64 tokens.
    block_index: int32 [B, N, T, K], the key tiles each query tile attends to (any order, no repeats).
    coarse_BNTD: [B, N, T, D] coarse output per query tile; gate_BNSD: [B, N, S, D] per-token gate.
        The term gate * coarse[tile of the token] is added only when both are given.
    Returns [B, N, S, D] in q's dtype and q's memory layout: softmax(q k^T / sqrt(D)) v over the real
    tokens of the selected tiles, accumulated in fp32 with an online softmax.
    Shapes are checked here with no host sync; call it outside the hot loop's validation.
    """
    if q_BNSD.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"vsa_fine_attention: dtype {q_BNSD.dtype} unsupported; use bf16, fp16 or fp32")
    head_dim = q_BNSD.shape[-1]
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"vsa_fine_attention: head dim {head_dim} must be a power of two in [16, 256]")
    if k_BNSD.shape != q_BNSD.shape or v_BNSD.shape != q_BNSD.shape:
        raise ValueError("vsa_fine_attention: q, k, v must share one [B, N, S, D] shape")
    if block_index.dim() != 4 or block_index.shape[:2] != q_BNSD.shape[:2]:
        raise ValueError("vsa_fine_attention: block_index must be [B, N, num_tiles, topk]")
    if tile_offsets.shape[0] != block_index.shape[2] + 1:
        raise ValueError("vsa_fine_attention: tile_offsets must have num_tiles + 1 entries")
    has_gate = gate_BNSD is not None and coarse_BNTD is not None
    if has_gate and (gate_BNSD.shape != q_BNSD.shape or coarse_BNTD.shape[2] != block_index.shape[2]):
        raise ValueError("vsa_fine_attention: gate must be [B, N, S, D] and coarse [B, N, num_tiles, D]")
    inputs = (q_BNSD, k_BNSD, v_BNSD, *((gate_BNSD,) if has_gate else ()))
    if q_BNSD.stride(-1) != 1 or any(t.stride() != q_BNSD.stride() for t in inputs):
        inputs = tuple(t.contiguous() for t in inputs)  # the kernel takes one shared layout
    q, k, v = inputs[:3]
    gate = inputs[3] if has_gate else None
    tile_offsets = tile_offsets.to(torch.int32).contiguous()
    block_index = block_index.to(torch.int32).contiguous()
    coarse = coarse_BNTD.contiguous() if has_gate else None  # read in its own dtype, summed in fp32
    return _vsa_fine_op(q, k, v, tile_offsets, block_index, coarse, gate)
