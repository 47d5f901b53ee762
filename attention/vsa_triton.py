"""Triton kernel of Video Sparse Attention's fine stage; ``attention.vsa_coarse_triton`` has the coarse stage.

One VSA call is four launches: tile means, block scores + coarse output, top-k (the coarse stage), then
``vsa_fine_attention``: the fine stage over the selected tiles, gate * coarse fused into its epilogue. On Hopper,
with packed key spans and TMA-able layouts, this is the Gluon kernel of ``attention.vsa_gluon`` (load mode 3);
everywhere else, and on CPU under the interpreter, the Triton kernel below.
The fine stage is also the torch op ``tessera::vsa_fine`` (with a fake impl for torch.compile). It runs on CPU
under ``TRITON_INTERPRET=1`` (set before importing triton); ``attention.vsa`` holds its torch spec.
Legend: B batch, N heads, S tokens (compact tile order), T tiles, K selected tiles per query tile, D head dim.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TILE_TOKENS = 64  # DESIGN tile (4, 4, 4) = 4 * 4 * 4 tokens: the most a compact tile can own
_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e)), folded into the softmax scale
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _attend_key_tile(
    q, K, V, acc, l_i, m_i, j, index_row, TILE_OFFSETS, head_off, stride_qs, desc_row, desc_col,
    offs_n, offs_d, qk_scale, dtype: tl.constexpr, LOAD_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr, SPANS: tl.constexpr,
):
    """One online-softmax step of a query tile over its j-th selected key tile: (acc, l_i, m_i) updated.

    Scores stay in the exp2 domain (qk_scale holds log2(e)); m_i is the running row max of the scaled scores.
    """
    entry = tl.load(index_row + j)
    if SPANS:  # the key tile's (start token << 7 | real tokens), precomputed by the top-k kernel: one load
        k_start = entry >> 7
        k_len = entry & 127
    else:  # a tile id: two dependent loads of its offsets
        k_start = tl.load(TILE_OFFSETS + entry)
        k_len = tl.load(TILE_OFFSETS + entry + 1) - k_start
    if LOAD_MODE == 2:
        k = K.load([desc_row + k_start, desc_col])
    else:
        cols = k_start + offs_n
        kv_offsets = head_off + cols[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
        k = tl.load(K + kv_offsets, mask=(offs_n < k_len)[:, None], other=0.0)  # keys past the tile: never read
    if DOT_IN_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32, unscaled
    # A uniform branch: only partial key tiles pay for the mask (masking every tile: +5% at Wan-1.3B).
    if k_len < BLOCK_N:
        s = tl.where((offs_n < k_len)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # finite: every tile owns >= 1 real token
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha
    acc = acc * alpha[:, None]
    p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one FMA per score, then exp2
    l_i = l_i + tl.sum(p, 1)
    if LOAD_MODE == 2:
        v = V.load([desc_row + k_start, desc_col])
    else:
        v = tl.load(V + kv_offsets, mask=(offs_n < k_len)[:, None], other=0.0)
    p_v = p.to(dtype)  # P rounded to the value dtype, as on GPU
    if DOT_IN_FP32:
        p_v, v = p_v.to(tl.float32), v.to(tl.float32)
    acc = tl.dot(p_v, v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _vsa_fine_kernel(
    Q, K, V,  # pointers [B, N, S, D] (LOAD_MODE 0) or host TMA descriptors of 2D row views (LOAD_MODE 2)
    OUT, GATE, COARSE,  # pointers; GATE shares q's layout
    stride_qb, stride_qn, stride_qs,  # q, k, v and gate share one layout (checked by the caller)
    stride_ob, stride_on, stride_os,  # OUT: q's layout when q is dense, else contiguous
    desc_row_b, desc_row_n, desc_col_n, desc_col_b,  # LOAD_MODE 2: row/column of (b, n, token 0) in the 2D view
    TILE_OFFSETS,  # int32 [T + 1]
    BLOCK_INDEX,  # int32 [B*N, T, topk]
    COARSE_STRIDE_BH,  # elements between consecutive (b, n) rows of COARSE [B*N, T, D]
    num_heads, num_tiles, topk,
    qk_scale,  # log2(e) / sqrt(D): scores in the exp2 domain
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOAD_MODE: tl.constexpr,  # 0 masked pointer loads, 2 host-side TMA descriptors
    HAS_GATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong; bf16 products are exact in fp32
    SPANS: tl.constexpr = False,  # BLOCK_INDEX holds packed key spans (start << 7 | length), not tile ids
):
    tile_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    n = bh % num_heads
    # int64 offsets: B*N*S*D exceeds 2**31 at 14B/720p with B=2
    head_off = b * stride_qb + n * stride_qn

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_start = tl.load(TILE_OFFSETS + tile_q)
    q_end = tl.load(TILE_OFFSETS + tile_q + 1)
    rows = q_start + offs_m
    row_mask = rows < q_end
    io_offsets = head_off + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    # The TMA path reads whole 64-row boxes from a tile's start: rows past its end belong to the next tile
    # (their scores are masked to -inf, so p = 0 there) or lie past the tensor (TMA zero-fills them).
    desc_row, desc_col = 0, 0  # LOAD_MODE 2: where (b, n, token 0) lies in the 2D row views
    if LOAD_MODE == 2:
        desc_row = (b * desc_row_b + n * desc_row_n).to(tl.int32)
        desc_col = (b * desc_col_b + n * desc_col_n).to(tl.int32)
        q = Q.load([desc_row + q_start, desc_col])
    else:
        q = tl.load(Q + io_offsets, mask=row_mask[:, None], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    index_row = BLOCK_INDEX + (bh * num_tiles + tile_q) * topk
    for j in range(0, topk):
        acc, l_i, m_i = _attend_key_tile(
            q, K, V, acc, l_i, m_i, j, index_row, TILE_OFFSETS, head_off, stride_qs,
            desc_row, desc_col, offs_n, offs_d, qk_scale, OUT.dtype.element_ty, LOAD_MODE, INPUT_PRECISION,
            DOT_IN_FP32, BLOCK_N, SPANS)

    out = acc * (1.0 / l_i)[:, None]
    if HAS_GATE:
        gate = tl.load(GATE + io_offsets, mask=row_mask[:, None], other=0.0).to(tl.float32)
        coarse = tl.load(COARSE + bh * COARSE_STRIDE_BH + tile_q * HEAD_DIM + offs_d).to(tl.float32)
        out += gate * coarse[None, :]
    out_offsets = b * stride_ob + n * stride_on + rows[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    tl.store(OUT + out_offsets, out.to(OUT.dtype.element_ty), mask=row_mask[:, None])


def _autotune_configs() -> list[triton.Config]:
    # Pointer path (LOAD_MODE 0) only. 4 warps = one warpgroup = one 64-row wgmma tile (8 warps measured
    # ~2x slower on H100 at 64 rows); num_stages 3 won at both Wan shapes, 2 and 4 stay for other GPUs.
    return [triton.Config({}, num_warps=4, num_stages=stages) for stages in (2, 3, 4)]


# restore_value: the output may alias q (VSAAttention(consume_q=True), the one-rank DiT path), and the autotuner runs
# the kernel once per config before the real launch: without restoring OUT, every benchmark run after the first read
# the previous run's output as q, and the first VSA call of a process returned attention of garbage queries (fp32 on
# one GPU: 2.3e-3 off after 4 steps while sp=2, whose output goes to the all-to-all buffer, matched the CPU).
# cache_results: the chosen config is kept in Triton's cache directory (`model.cache_dir`), so a warm launch does not
# benchmark the configs again (the interpreter never caches).
_vsa_fine_kernel_tuned = triton.autotune(
    configs=_autotune_configs(), key=["HEAD_DIM", "HAS_GATE", "LOAD_MODE", "topk"], restore_value=["OUT"],
    **({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}),
)(_vsa_fine_kernel)


# Fixed config of the TMA path, measured on H100 (triton 3.6, `bench/attention.py --variants`) at sparsity 0.9:
# with packed key spans, 2.22 / 39.4 ms at Wan-1.3B / 14B with 3 stages (2 stages: 2.41 / 45.5, 4: 2.95 / 54.0);
# tile ids + offset lookups in the same process: 2.36 / 44.4 ms. Before the key mask
# moved behind a branch, 4 stages had won. A lazily rescaled softmax (FA4's trick, skipping acc *= alpha
# until the max grows by 2**8) measured 2.50 ms: its block-wide max costs more than the multiply it saves.
# Device-side descriptors (tl.make_tensor_descriptor) measured the same as host ones and were dropped;
# Triton's automatic warp specialisation of the loop: 4.2 ms (and wrong results) there.
_TMA_CONFIGS = {2: dict(num_warps=4, num_stages=3)}


def _tma_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list | None:
    """The TMA row views (``_host_desc_view``) of q, k, v when load mode 2 serves them: Hopper and newer, 16-bit,
    D = 128, a layout with a 2D row view; else None."""
    if not q.is_cuda or _INTERPRET or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    if torch.cuda.get_device_capability(q.device)[0] < 9 or q.shape[-1] != 128:
        return None  # the TMA path is measured and checked on GPU at D = 128 only
    views = [_host_desc_view(x) for x in (q, k, v)]
    return None if any(view is None for view in views) else views


def _default_load_mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """2 (TMA, host descriptors) where ``_tma_views`` serves q, k, v, else 0 (masked pointer loads)."""
    return 0 if _tma_views(q, k, v) is None else 2


_GLUON_BROKEN: list[str] = []  # why the Gluon kernel did not compile in this process, if it did not


def gluon_fine_available(device: torch.device, dtype: torch.dtype | None, head_dim: int | None) -> bool:
    """Whether the Gluon fine kernel can serve this device (and dtype / head dim, when known): what
    ``VSAAttention(fine_kernel="auto")`` resolves once. A call's layout is still checked per call (``_gluon_views``)."""
    from tessera.attention.vsa_gluon import HAVE_GLUON

    device = torch.device(device)
    return (HAVE_GLUON and not _INTERPRET and device.type == "cuda" and dtype in (None, torch.bfloat16, torch.float16)
            and head_dim in (None, 128) and torch.cuda.get_device_capability(device)[0] == 9)


def _gluon_views(q, k, v, out, gate, qkv_views: list | None = None) -> list | None:
    """The TMA row views (``_host_desc_view``) of q, k, v, out and gate (None for no gate) when the Gluon kernel
    (load mode 3) can take this call, else None. Called where load mode 2 already holds (CUDA, 16-bit, D = 128,
    views of q, k, v: ``qkv_views`` when the caller has them); it adds: compute capability 9.x, views of out and
    the gate, and the kernel compiled with this triton."""
    if _GLUON_BROKEN:
        return None
    from tessera.attention.vsa_gluon import gluon_fine_supported

    if not gluon_fine_supported(q):
        return None
    qkv_views = qkv_views or [_host_desc_view(x) for x in (q, k, v)]
    views = [*qkv_views, *(None if x is None else _host_desc_view(x) for x in (out, gate))]
    if any(view is None for view in views[:4]) or (gate is not None and views[4] is None):
        return None
    return views
def _run_gluon(views, out, coarse, tile_offsets, spans, config, forced: bool) -> torch.Tensor | None:
    """The Gluon fine kernel (``attention.vsa_gluon``) on the views of q, k, v, out, gate (``_gluon_views``).
    Gluon is experimental and its API moves between triton releases: unless ``forced``, a compile error is
    reported once as a warning and returns None, and the Triton kernel serves this and every later call."""
    from tessera.attention import vsa_gluon
    from triton.compiler.errors import CompilationError

    try:
        return vsa_gluon.launch_gluon_fine(views[:3], views[3], out, tile_offsets, spans, coarse, views[4],
                                           _LOG2E / math.sqrt(out.shape[-1]), **(config or {}))
    except CompilationError as exc:
        if forced:
            raise
        _GLUON_BROKEN.append(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        warnings.warn(f"vsa_fine_attention: the Gluon kernel does not compile with triton {triton.__version__} "
                      f"({_GLUON_BROKEN[0]}); the Triton kernel serves instead", RuntimeWarning, stacklevel=3)
        return None


def _host_desc_view(x: torch.Tensor):
    """(2D row view, row_b, row_n, col_n, col_b) such that token s of (b, n) is row b*row_b + n*row_n + s at column
    b*col_b + n*col_n, else None. Three layouts: BSND-contiguous ([B, S, N, D] viewed as BNSD), BNSD-contiguous,
    and token-major ``[S, ..., B, N, D]`` slices (batch and heads inside one token row of any pitch, as Ulysses
    receives q, k, v and the gate, or hands the output back)."""
    batch, heads, seq, dim = x.shape
    if x.data_ptr() % 16:
        return None
    sb, sn, ss, sd = x.stride()
    if sd != 1:
        return None
    if (sb, sn, ss) == (seq * heads * dim, dim, heads * dim):
        return x.transpose(1, 2).reshape(batch * seq, heads * dim), seq, 0, dim, 0
    if (sb, sn, ss) == (heads * seq * dim, seq * dim, dim):
        return x.reshape(batch * heads * seq, dim), heads * seq, seq, 0, 0
    if (sn == dim or heads == 1) and (sb == heads * dim or batch == 1) and ss >= batch * heads * dim and ss % 8 == 0:
        return torch.as_strided(x, (seq, batch * heads * dim), (ss, 1)), 0, 0, dim, heads * dim
    return None


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_offsets: torch.Tensor,
    block_index: torch.Tensor, coarse: torch.Tensor | None, gate: torch.Tensor | None,
    load_mode: int | None = None, config: dict | None = None, out: torch.Tensor | None = None,
    spans: bool = False, gluon: bool = False,
) -> torch.Tensor:
    """load_mode / config force a variant (benchmarks): load_mode 0 pointer loads, 2 TMA, 3 the Gluon kernel (config
    then holds launch_gluon_fine's options); None picks the fastest Triton variant that serves the call, or the
    Gluon kernel when ``gluon`` (chosen once by the caller) and the call's layout allows it.
    ``out``: write there (any D-contiguous layout; may alias q, see vsa_fine_attention)."""
    batch, heads, seq_len, head_dim = q.shape
    num_tiles, topk = block_index.shape[2], block_index.shape[3]
    # q's strides when q is dense (a [B, S, N, D] caller gets its layout back), else contiguous (a q
    # sliced out of a fused projection)
    out = torch.empty_like(q) if out is None else out
    has_gate = gate is not None and coarse is not None
    gate_arg = gate if has_gate else q  # never read when HAS_GATE is False
    coarse_arg = coarse if has_gate else q
    grid = (num_tiles, batch * heads)
    qkv_views = _tma_views(q, k, v) if load_mode is None else None  # built once per call (host time)
    mode = (0 if qkv_views is None else 2) if load_mode is None else load_mode
    gluon_tensors = (q, k, v, out, gate if has_gate else None)
    gluon_rest = (out, coarse if has_gate else None, tile_offsets, block_index)
    if mode == 3:  # forced (benchmarks, tests): packed spans and TMA views required
        views = [None if x is None else _host_desc_view(x) for x in gluon_tensors]
        return _run_gluon(views, *gluon_rest, config, forced=True)
    use_gluon = gluon and spans and load_mode is None and config is None and mode == 2
    views = _gluon_views(*gluon_tensors, qkv_views) if use_gluon else None
    if views is not None:
        result = _run_gluon(views, *gluon_rest, None, forced=False)
        if result is not None:
            return result
    qkv, desc_geometry = (q, k, v), (0, 0, 0, 0)
    if mode == 2:
        from triton.tools.tensor_descriptor import TensorDescriptor

        views = qkv_views or [_host_desc_view(x) for x in (q, k, v)]
        qkv = tuple(TensorDescriptor.from_tensor(view[0], [_TILE_TOKENS, head_dim]) for view in views)
        desc_geometry = views[0][1:]
    args = (*qkv, out, gate_arg, coarse_arg, *q.stride()[:3], *out.stride()[:3], *desc_geometry, tile_offsets,
            block_index, num_tiles * head_dim, heads, num_tiles, topk, _LOG2E / math.sqrt(head_dim))
    interpret = _INTERPRET or not q.is_cuda
    dot_in_fp32 = interpret and q.dtype == torch.bfloat16
    meta = dict(HEAD_DIM=head_dim, BLOCK_M=_TILE_TOKENS, BLOCK_N=_TILE_TOKENS, LOAD_MODE=mode,
                HAS_GATE=has_gate, INPUT_PRECISION="ieee" if q.dtype == torch.float32 or dot_in_fp32 else "tf32",
                DOT_IN_FP32=dot_in_fp32, SPANS=spans)
    if interpret:
        _vsa_fine_kernel[grid](*args, **meta, num_warps=4, num_stages=1)
    elif config is not None or mode in _TMA_CONFIGS:
        _vsa_fine_kernel[grid](*args, **meta, **(config or _TMA_CONFIGS[mode]))
    else:
        _vsa_fine_kernel_tuned[grid](*args, **meta)
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
    out_BNSD: torch.Tensor | None = None,
    key_spans: torch.Tensor | None = None,
    gluon: bool = False,
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
    out_BNSD: write the result there and return it (D contiguous, q's shape and dtype). It may be q_BNSD
        itself: each program reads its own query rows before it writes exactly those rows, so the output
        needs no allocation of its own (the caller gives up q). This path calls the kernel directly,
        not through the `tessera::vsa_fine` op (which is for torch.compile graphs).
    key_spans: optional int32 of block_index's shape, each entry ``start << 7 | length`` of a selected key tile
        (written by ``vsa_select_from_means`` with tile_offsets, whole tiles first; any order serves): the
        kernel then reads only these, not block_index or the tile offsets of key tiles.
    gluon: run the Gluon kernel instead of the Triton one where key_spans are given and the layout allows it
        (Hopper, 16-bit, D = 128); chosen once by the caller (``VSAAttention.kernel``), never per call.
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
    if key_spans is not None:
        if key_spans.shape != block_index.shape or key_spans.dtype != torch.int32:
            raise ValueError("vsa_fine_attention: key_spans must be int32 with block_index's shape")
        block_index = key_spans.contiguous()
    if out_BNSD is not None:
        if out_BNSD.shape != q_BNSD.shape or out_BNSD.dtype != q_BNSD.dtype or out_BNSD.stride(-1) != 1:
            raise ValueError("vsa_fine_attention: out must have q's shape and dtype, D contiguous")
    if out_BNSD is not None or key_spans is not None:
        return _launch(q, k, v, tile_offsets, block_index, coarse, gate, out=out_BNSD, spans=key_spans is not None,
                       gluon=gluon)
    return _vsa_fine_op(q, k, v, tile_offsets, block_index, coarse, gate)
