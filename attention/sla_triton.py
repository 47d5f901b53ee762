"""Triton kernels of Sparse-Linear Attention (SLA); ``attention.sla`` holds the torch spec of each step.

One SLA call (``SLAAttention`` with impl="triton") is five launches and a few tiny torch ops:
1. ``sla_pooled_scores``: fp32 block means of q and of k (one Triton launch each); in torch, the sequence mean of k
   is subtracted from the key-block means and the scores are one fp32 matmul ([Q, D] x [D, K] per head: tiny).
2. ``sla_topk_blocks``: the top-J key blocks per query block, ties to the lower index: VSA's radix-select kernel
   (``vsa_coarse_triton.vsa_topk_lower_index_wins``), which keeps NaN rows on real, distinct block indices.
3. ``sla_linear_state``: phi(k)^T v [D, D] and sum_s phi(k_s) [D] per head, in sequence chunks (partials summed in
   torch, deterministic).
4. ``sla_sparse_attention``: FlashAttention-style online softmax over the selected key blocks; the epilogue adds
   proj_l(phi(q) kv / (eps + phi(q) . ksum)) = phi(q) (kv W^T) / (...) + b (proj_l folded into the [D, D] state by one
   tiny torch matmul), so neither o_sparse nor o_linear goes through memory.
All run on CPU under ``TRITON_INTERPRET=1`` (set before importing triton).
Legend: B batch, N heads, S tokens (raster order), D head dim, Q query blocks, K key blocks, J selected key blocks.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from tessera.attention.sla import SLA_FEATURE_MAPS, SLA_LINEAR_EPS
from tessera.attention.vsa_coarse_triton import vsa_topk_lower_index_wins

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e)), folded into the softmax scale
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FEATURE_MAP_IDS = {name: i for i, name in enumerate(SLA_FEATURE_MAPS)}  # softmax 0, elu 1, relu 2
_STATE_ROWS = 64  # key tokens per step of the linear-state kernel
_STATE_PROGRAMS = 528  # linear-state programs to aim for: 4 per SM of an H100/H200 (132 SMs)


@triton.jit
def _feature_map(x, FEATURE_MAP: tl.constexpr):
    """phi of fp32 x [R, D] over D: 0 softmax (no scale), 1 elu(x) + 1, 2 relu."""
    if FEATURE_MAP == 0:
        e = tl.exp(x - tl.max(x, 1)[:, None])
        phi = e / tl.sum(e, 1)[:, None]
    elif FEATURE_MAP == 1:
        phi = tl.where(x > 0, x + 1.0, tl.exp(x))  # elu(x) + 1 == exp(x) for x <= 0
    else:
        phi = tl.maximum(x, 0.0)
    return phi


@triton.jit
def _block_means_kernel(
    X, OUT,  # X [B, N, S, D] (D contiguous); OUT fp32 [B*N, num_blocks, D]
    stride_xb, stride_xn, stride_xs,
    seq_len, num_heads, num_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,  # tokens per SLA block
    ROWS: tl.constexpr,  # tokens per load: min(BLOCK, 64)
):
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = (bh // num_heads) * stride_xb + (bh % num_heads) * stride_xn
    start = blk * BLOCK
    stop = tl.minimum(start + BLOCK, seq_len)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in range(0, BLOCK, ROWS):
        rows = start + r0 + tl.arange(0, ROWS)
        x = tl.load(X + base + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :], mask=(rows < stop)[:, None],
                    other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    tl.store(OUT + (bh * num_blocks + blk) * HEAD_DIM + offs_d, acc / (stop - start).to(tl.float32))


@triton.jit
def _linear_state_kernel(
    K, V, KV, KSUM,  # K, V [B, N, S, D]; KV fp32 [B*N, C, D, D] and KSUM fp32 [B*N, C, D]: one per sequence chunk
    stride_kb, stride_kn, stride_ks, stride_vb, stride_vn, stride_vs,
    seq_len, num_heads, num_chunks, chunk_len,  # chunk_len: a multiple of BLOCK_S
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    FEATURE_MAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, n = bh // num_heads, bh % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    start = chunk * chunk_len
    stop = tl.minimum(start + chunk_len, seq_len)
    kv = tl.zeros([HEAD_DIM, HEAD_DIM], dtype=tl.float32)
    ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        rows = s0 + offs_s
        ok = rows < stop
        k = tl.load(K + b * stride_kb + n * stride_kn + rows[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + b * stride_vb + n * stride_vn + rows[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        phi = tl.where(ok[:, None], _feature_map(k, FEATURE_MAP), 0.0)  # softmax of a zero row is not zero
        kv = tl.dot(tl.trans(phi), v, kv, input_precision=PRECISION)
        ksum += tl.sum(phi, 0)
    part = bh * num_chunks + chunk
    tl.store(KV + part * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :], kv)
    tl.store(KSUM + part * HEAD_DIM + offs_d, ksum)


@triton.jit
def _attend_key_chunk(
    q, K, V, acc, l_i, m_i, start, stop, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, qk_scale,
    dtype: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One online-softmax step over key tokens [start, min(start + BLOCK_N, stop)): (acc, l_i, m_i) updated.

    Scores stay in the exp2 domain (qk_scale holds log2(e)); m_i is the running row max of the scaled scores.
    """
    cols = start + offs_n
    col_ok = cols < stop
    k = tl.load(K + k_base + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if DOT_IN_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32, unscaled
    if stop - start < BLOCK_N:  # a uniform branch: only partial key chunks pay for the mask
        s = tl.where(col_ok[None, :], s, float("-inf"))
    # finite: the first chunk of every selected block owns >= 1 real token, and it comes first
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one FMA per score, then exp2
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + v_base + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    p_v = p.to(dtype)  # P rounded to the value dtype, as FlashAttention does
    if DOT_IN_FP32:
        p_v, v = p_v.to(tl.float32), v.to(tl.float32)
    acc = tl.dot(p_v, v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _linear_branch(
    q, KVW, KSUM, BIAS, bh, offs_d, eps,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, FEATURE_MAP: tl.constexpr, PRECISION: tl.constexpr,
):
    """proj_l(phi(q) kv / (eps + phi(q) . ksum)) = phi(q) (kv W^T) / (eps + phi(q) . ksum) + b of the query rows
    q [M, D]: fp32 [M, D]. KVW holds kv W^T (proj_l folded into the state: one [M, D] x [D, D] product here)."""
    phi_q = _feature_map(q.to(tl.float32), FEATURE_MAP)
    kvw = tl.load(KVW + bh * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
    ksum = tl.load(KSUM + bh * HEAD_DIM + offs_d)
    y = tl.dot(phi_q, kvw, input_precision=PRECISION) / (eps + tl.sum(phi_q * ksum[None, :], 1))[:, None]
    if HAS_BIAS:
        y += tl.load(BIAS + offs_d).to(tl.float32)[None, :]
    return y


@triton.jit
def _sla_sparse_kernel(
    Q, K, V, OUT,  # [B, N, S, D], D contiguous, each its own strides
    BLOCK_INDEX,  # int32 [B*N, Q, J]: selected key blocks per query block
    KVW, KSUM, BIAS,  # HAS_LINEAR: fp32 kv W^T [B*N, D, D], fp32 ksum [B*N, D], proj_l bias [D]
    stride_qb, stride_qn, stride_qs, stride_kb, stride_kn, stride_ks,
    stride_vb, stride_vn, stride_vs, stride_ob, stride_on, stride_os,
    seq_len, num_heads, num_q_blocks, num_selected,
    qk_scale,  # log2(e) / sqrt(D): scores in the exp2 domain
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # SLA query block (the selection's granularity)
    BLOCK_K: tl.constexpr,  # SLA key block
    BLOCK_M: tl.constexpr,  # query rows per program: M_CHUNKS programs share one query block
    BLOCK_N: tl.constexpr,  # key tokens per step: K_CHUNKS steps cover one key block
    M_CHUNKS: tl.constexpr,
    K_CHUNKS: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FEATURE_MAP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    LINEAR_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its 16-bit tl.dot is wrong; 16-bit products are exact in fp32
):
    pid = tl.program_id(0)
    q_block = pid // M_CHUNKS
    bh = tl.program_id(1).to(tl.int64)
    b, n = bh // num_heads, bh % num_heads  # int64 offsets: B*N*S*D exceeds 2**31 at 14B/720p with B=2
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    rows = q_block * BLOCK_Q + (pid % M_CHUNKS) * BLOCK_M + offs_m
    row_ok = rows < tl.minimum(q_block * BLOCK_Q + BLOCK_Q, seq_len)
    q = tl.load(Q + b * stride_qb + n * stride_qn + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    q_dot = q.to(tl.float32) if DOT_IN_FP32 else q

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = b * stride_kb + n * stride_kn
    v_base = b * stride_vb + n * stride_vn
    index_row = BLOCK_INDEX + (bh * num_q_blocks + q_block) * num_selected
    for j in range(0, num_selected):
        key_start = tl.load(index_row + j) * BLOCK_K
        key_stop = tl.minimum(key_start + BLOCK_K, seq_len)
        for c in tl.static_range(K_CHUNKS):
            acc, l_i, m_i = _attend_key_chunk(
                q_dot, K, V, acc, l_i, m_i, key_start + c * BLOCK_N, key_stop, k_base, v_base, stride_ks, stride_vs,
                offs_n, offs_d, qk_scale, V.dtype.element_ty, INPUT_PRECISION, DOT_IN_FP32, BLOCK_N)

    out = acc / l_i[:, None]
    if HAS_LINEAR:
        out += _linear_branch(q, KVW, KSUM, BIAS, bh, offs_d, eps, HEAD_DIM, HAS_BIAS, FEATURE_MAP, LINEAR_PRECISION)
    out_offsets = b * stride_ob + n * stride_on + rows[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    tl.store(OUT + out_offsets, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def _interpreted(x: torch.Tensor) -> bool:
    return _INTERPRET or not x.is_cuda


def _d_contiguous(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def sla_block_means(x_BNSD: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 mean of each block of ``block`` consecutive tokens over its real tokens: [B, N, ceil(S / block), D].

    x_BNSD: [B, N, S, D], any float dtype and strides (D contiguous, else copied). One launch, one read of x.
    """
    (x,) = _d_contiguous(x_BNSD)
    batch, heads, seq_len, head_dim = x.shape
    num_blocks = triton.cdiv(seq_len, block)
    out = torch.empty(batch, heads, num_blocks, head_dim, device=x.device, dtype=torch.float32)
    _block_means_kernel[(num_blocks, batch * heads)](
        x, out, *x.stride()[:3], seq_len, heads, num_blocks,
        HEAD_DIM=head_dim, BLOCK=block, ROWS=min(block, 64), num_warps=4 if head_dim * min(block, 64) >= 4096 else 2,
    )
    return out


def sla_pooled_scores(q_BNSD: torch.Tensor, k_BNSD: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """SLA block scores, fp32 [B, N, Q, K]: ``mean_q[qb] . (mean_k[kb] - mean of k over all S)``, no scale.

    Equals ``attention.sla.sla_block_scores`` up to fp32 summation order (the sequence mean of k is taken from
    the key-block means here, weighted by their real token counts). q_BNSD, k_BNSD: [B, N, S, D], one shape.
    """
    if k_BNSD.shape != q_BNSD.shape:
        raise ValueError("sla_pooled_scores: q and k must share one [B, N, S, D] shape")
    seq_len = q_BNSD.shape[2]
    q_means = sla_block_means(q_BNSD, block_q)
    k_means = sla_block_means(k_BNSD, block_k)
    last = seq_len - (k_means.shape[2] - 1) * block_k  # real tokens of the last key block
    k_mean = (k_means[:, :, :-1].sum(2, keepdim=True) * block_k + k_means[:, :, -1:] * last) / seq_len
    return torch.matmul(q_means, (k_means - k_mean).transpose(-1, -2))


def sla_topk_blocks(scores_BNQK: torch.Tensor, num_selected: int) -> torch.Tensor:
    """The ``num_selected`` highest-scoring key blocks per query block, ties to the lower index: int32 [B, N, Q, J],
    ascending. One launch (VSA's radix select); exactly ``attention.sla.sla_topk_reference`` on the same finite scores.
    NaN scores still give real, distinct block indices (where NaN ranks among numbers differs from the reference)."""
    return vsa_topk_lower_index_wins(scores_BNQK, num_selected)


def _state_chunks(programs_per_chunk: int, seq_len: int) -> tuple[int, int]:
    """(num_chunks, chunk_len) splitting S so that ~_STATE_PROGRAMS programs run; chunk_len a multiple of 64."""
    max_chunks = triton.cdiv(seq_len, _STATE_ROWS)
    num_chunks = max(1, min(max_chunks, triton.cdiv(_STATE_PROGRAMS, programs_per_chunk)))
    chunk_len = triton.cdiv(triton.cdiv(seq_len, num_chunks), _STATE_ROWS) * _STATE_ROWS
    return triton.cdiv(seq_len, chunk_len), chunk_len


def sla_linear_state(
    k_BNSD: torch.Tensor, v_BNSD: torch.Tensor, feature_map: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear branch's state over all tokens: ``(kv fp32 [B, N, D, D] = phi(k)^T v, ksum fp32 [B, N, D] = sum_s
    phi(k_s))``, phi computed in fp32 (``attention.sla.sla_feature``). k, v: [B, N, S, D], one shape, D contiguous
    (else copied). Sequence chunks run in parallel; their partials are summed in torch (deterministic)."""
    if v_BNSD.shape != k_BNSD.shape:
        raise ValueError("sla_linear_state: k and v must share one [B, N, S, D] shape")
    k, v = _d_contiguous(k_BNSD, v_BNSD)
    batch, heads, seq_len, head_dim = k.shape
    num_chunks, chunk_len = _state_chunks(batch * heads, seq_len)
    kv = torch.empty(batch * heads, num_chunks, head_dim, head_dim, device=k.device, dtype=torch.float32)
    ksum = torch.empty(batch * heads, num_chunks, head_dim, device=k.device, dtype=torch.float32)
    # fp32 operands: 3xTF32 (fp32-accurate on tensor cores) for fp32 inputs; for 16-bit ones v is exact in TF32 and
    # phi's TF32 rounding (2**-11) stays far below the 16-bit output's. The interpreter has no TF32.
    precision = "ieee" if _interpreted(k) else ("tf32x3" if k.dtype == torch.float32 else "tf32")
    _linear_state_kernel[(num_chunks, batch * heads)](
        k, v, kv, ksum, *k.stride()[:3], *v.stride()[:3], seq_len, heads, num_chunks, chunk_len,
        HEAD_DIM=head_dim, BLOCK_S=_STATE_ROWS, FEATURE_MAP=_FEATURE_MAP_IDS[feature_map],
        # fp32 k and v tiles are 2 x 32 KB a stage at D = 128: 3 stages and the dot operands exceed shared memory
        PRECISION=precision, num_warps=8 if head_dim >= 128 else 4, num_stages=2 if k.element_size() == 4 else 3,
    )
    return kv.sum(1).view(batch, heads, head_dim, head_dim), ksum.sum(1).view(batch, heads, head_dim)


# Tile shape of the sparse kernel at the checkpoints' 128 x 64 blocks, by element size: 16-bit, one 128-row program
# per query block with 8 warps (two warpgroups), 64 keys per step (one key block), 3 stages; fp32 (twice the bytes
# per tile: 128 rows and 3 stages would need 256 KB of shared memory), 64 rows, 4 warps, 2 stages.
# On an H200 (`python bench/attention.py --sla-only --shapes wan1.3b-480p --sla-topk 0.1`, bf16, 12 heads, J = 51 of
# 512): sparse part 1.72 ms (~385 real TFLOP/s), with the linear epilogue 2.35 ms (of which the state 0.38), full call
# 2.68 ms eager / 2.39 ms in a CUDA graph against cuDNN's dense 11.67 / 11.53 ms. TODO: the alternatives that
# `--variants` times (64-row programs, other warps and stages) were not measured yet.
_SPARSE_CONFIGS = {2: dict(BLOCK_M=128, num_warps=8, num_stages=3), 4: dict(BLOCK_M=64, num_warps=4, num_stages=2)}


def sla_sparse_attention(
    q_BNSD: torch.Tensor,
    k_BNSD: torch.Tensor,
    v_BNSD: torch.Tensor,
    block_index: torch.Tensor,
    block_q: int,
    block_k: int,
    *,
    feature_map: str = "softmax",
    proj_l_weight: torch.Tensor | None = None,
    proj_l_bias: torch.Tensor | None = None,
    out_BNSD: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``o_sparse + proj_l(o_linear)`` of SLA over raster-order blocks (see ``attention.sla.sla_attention_reference``).

    q_BNSD, k_BNSD, v_BNSD: [B, N, S, D], one dtype of bf16/fp16/fp32, D in 16/32/64/128, any strides with D
        contiguous (each read in place with its own strides).
    block_index: int32 [B, N, Q, J], Q = ceil(S / block_q): the key blocks (of block_k tokens; the last may be
        partial) each query block attends to, distinct, any order. block_q, block_k: powers of two.
    proj_l_weight [D, D], proj_l_bias [D] or None: the linear branch ``(phi(q) kv / (eps + phi(q) . ksum)) W^T + b``
        (``sla_linear_state``) is added in the epilogue in fp32; ``proj_l_weight=None`` means proj_l = 0.
    out_BNSD: write there (q's shape and dtype, D contiguous; may be q itself: each program reads its query rows
        before it writes exactly those) and return it; else a new tensor in q's layout when q is dense.
    Returns [B, N, S, D] in q's dtype. Softmax with scale 1/sqrt(D), fp32 accumulation, P rounded to v's dtype.
    ``config`` overrides ``_SPARSE_CONFIGS`` (benchmarks). Checks shapes only (no host sync).
    """
    if q_BNSD.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"sla_sparse_attention: dtype {q_BNSD.dtype} unsupported; use bf16, fp16 or fp32")
    batch, heads, seq_len, head_dim = q_BNSD.shape
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"sla_sparse_attention: head dim {head_dim} must be 16, 32, 64 or 128")
    if k_BNSD.shape != q_BNSD.shape or v_BNSD.shape != q_BNSD.shape or len({k_BNSD.dtype, v_BNSD.dtype}) != 1:
        raise ValueError("sla_sparse_attention: q, k, v must share one [B, N, S, D] shape (k, v one dtype)")
    num_q_blocks = triton.cdiv(seq_len, block_q)
    if block_index.dim() != 4 or block_index.shape[:3] != (batch, heads, num_q_blocks):
        raise ValueError(f"sla_sparse_attention: block_index must be [B, N, ceil(S / block_q) = {num_q_blocks}, J]")
    if proj_l_weight is not None and (proj_l_weight.shape != (head_dim, head_dim)
                                      or (proj_l_bias is not None and proj_l_bias.shape != (head_dim,))):
        raise ValueError(f"sla_sparse_attention: proj_l must be weight [{head_dim}, {head_dim}] and bias [{head_dim}]")
    if out_BNSD is not None and (out_BNSD.shape != q_BNSD.shape or out_BNSD.dtype != q_BNSD.dtype
                                 or out_BNSD.stride(-1) != 1):
        raise ValueError("sla_sparse_attention: out must have q's shape and dtype, D contiguous")
    q, k, v = _d_contiguous(q_BNSD, k_BNSD, v_BNSD)
    block_index = block_index.to(torch.int32).contiguous()
    out = torch.empty_like(q) if out_BNSD is None else out_BNSD
    has_linear = proj_l_weight is not None
    if has_linear:
        kv, ksum = sla_linear_state(k, v, feature_map)
        # proj_l folded into the state: (phi(q) kv / den) W^T == phi(q) (kv W^T) / den, den a scalar per query; the
        # epilogue then does one [M, D] x [D, D] product, not two (and holds one fp32 [D, D] tile in shared memory)
        kvw = torch.matmul(kv, proj_l_weight.float().t())
        bias = proj_l_bias.contiguous() if proj_l_bias is not None else ksum  # never read without HAS_BIAS
    else:
        kvw = ksum = bias = block_index  # never read without HAS_LINEAR
    interpret = _interpreted(q)
    config = {**_SPARSE_CONFIGS[q.element_size()], **(config or {})}
    block_m = min(max(block_q, 16), config.pop("BLOCK_M"))  # tl.dot needs >= 16 rows; rows past the block are masked
    block_n = min(max(block_k, 16), 64)  # 64 keys per step; a block of 128 keys takes two
    if interpret:
        config = dict(num_warps=4, num_stages=1)
    fp32 = q.dtype == torch.float32
    _sla_sparse_kernel[(num_q_blocks * triton.cdiv(block_q, block_m), batch * heads)](
        q, k, v, out, block_index, kvw, ksum, bias,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        seq_len, heads, num_q_blocks, block_index.shape[3], _LOG2E / math.sqrt(head_dim), SLA_LINEAR_EPS,
        HEAD_DIM=head_dim, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_N=block_n,
        M_CHUNKS=triton.cdiv(block_q, block_m), K_CHUNKS=triton.cdiv(block_k, block_n), HAS_LINEAR=has_linear,
        HAS_BIAS=has_linear and proj_l_bias is not None, FEATURE_MAP=_FEATURE_MAP_IDS[feature_map],
        # fp32 inputs: 3xTF32 (fp32-accurate); 16-bit: their products are exact in any precision. The linear
        # branch's fp32 operands: plain TF32 when the output is 16-bit (its rounding dominates), else 3xTF32.
        INPUT_PRECISION="ieee" if interpret else ("tf32x3" if fp32 else "tf32"),
        LINEAR_PRECISION="ieee" if interpret else ("tf32x3" if fp32 else "tf32"),
        DOT_IN_FP32=interpret and not fp32, **config,
    )
    return out
