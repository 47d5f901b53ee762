"""Triton kernels of VSA's coarse stage: three launches that turn q, k, v into the fine stage's inputs.

1. ``vsa_tile_means``: per-tile means of q, k, v (one launch, one read of each).
2. ``vsa_select_from_means``: block scores + the coarse output (online softmax over all key tiles), then
3. the top-k key tiles per query tile (``vsa_topk_lower_index_wins``, a radix select per score row), which also
   writes each selected tile's packed key span for the fine stage (``attention.vsa_triton``).
All run on CPU under ``TRITON_INTERPRET=1``; ``attention.vsa`` holds the torch spec of each. The defaults below
were measured with ``python bench/attention.py --variants`` (H100 unless said).
Legend: B batch, N heads, S tokens (compact tile order), T tiles, D head dim.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from tessera.attention.vsa_triton import _INTERPRET, _TILE_TOKENS

__all__ = ["vsa_select_from_means", "vsa_tile_means", "vsa_topk_lower_index_wins"]


@triton.jit
def _tile_means_kernel(
    X0, X1, X2, OUT,  # X*: [B, N, S, D], one shared layout (D contiguous); OUT [len(X), B, N, T, D] contiguous
    stride_xb, stride_xn, stride_xs,
    TILE_OFFSETS,  # int32 [T + 1]
    num_heads, num_tiles, out_stride_x,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr = 1,  # heads per program (a power of two)
):
    tile = tl.program_id(0)
    groups = tl.cdiv(num_heads, HEADS)
    b = (tl.program_id(1) // groups).to(tl.int64)
    which = tl.program_id(2)  # q, k, v in one launch
    if which == 0:
        X = X0
    elif which == 1:
        X = X1
    else:
        X = X2
    start = tl.load(TILE_OFFSETS + tile)
    end = tl.load(TILE_OFFSETS + tile + 1)
    rows = start + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEADS * HEAD_DIM)
    head = (tl.program_id(1) % groups) * HEADS + cols // HEAD_DIM
    offs_d = cols % HEAD_DIM
    head_ok = head < num_heads
    offsets = (b * stride_xb + head[None, :].to(tl.int64) * stride_xn + rows[:, None].to(tl.int64) * stride_xs
               + offs_d[None, :])
    x = tl.load(X + offsets, mask=(rows < end)[:, None] & head_ok[None, :], other=0.0)
    mean = tl.sum(x.to(tl.float32), 0) / (end - start).to(tl.float32)  # fp32 accumulation, then rounded
    out = OUT + which.to(tl.int64) * out_stride_x + ((b * num_heads + head) * num_tiles + tile) * HEAD_DIM + offs_d
    tl.store(out, mean.to(OUT.dtype.element_ty), mask=head_ok)


@triton.jit
def _coarse_kernel(
    QC, KC, VC,  # tile means [B*N, T, D] contiguous, one dtype
    SCORES,  # fp32 [B*N, T, T] out: block scores q_c k_c^T / sqrt(D)
    COARSE,  # fp32 [B*N, T, D] out: softmax over all key tiles of the scores, times v_c; with SPLITS > 1
    # fp32 [B*N, SPLITS, T, D + 2] instead: each split's unnormalised output, running max and sum (_combine_kernel)
    num_tiles,
    scale,  # 1 / sqrt(D), applied in fp32 after the product (as the torch spec does)
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCORE_PRECISION: tl.constexpr,
    COARSE_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SPLITS: tl.constexpr = 1,  # programs per query block, each over its own range of key tiles
):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < num_tiles
    offs_d = tl.arange(0, HEAD_DIM)
    means = bh * num_tiles * HEAD_DIM
    qc = tl.load(QC + means + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_IN_FP32:
        qc = qc.to(tl.float32)
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], dtype=tl.float32)
    score_rows = SCORES + bh * num_tiles * num_tiles + rows[:, None].to(tl.int64) * num_tiles
    per_split = tl.cdiv(tl.cdiv(num_tiles, SPLITS), BLOCK_K) * BLOCK_K
    k_start = tl.program_id(2) * per_split
    k_end = tl.minimum(k_start + per_split, num_tiles)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        kv_offsets = means + cols[:, None] * HEAD_DIM + offs_d[None, :]
        kc = tl.load(KC + kv_offsets, mask=col_ok[:, None], other=0.0)
        if DOT_IN_FP32:
            kc = kc.to(tl.float32)
        # means hold 16-bit values (or fp32 with an ieee dot): their products are exact in fp32
        s = tl.dot(qc, tl.trans(kc), input_precision=SCORE_PRECISION) * scale
        tl.store(score_rows + cols[None, :], s, mask=row_ok[:, None] & col_ok[None, :])
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vc = tl.load(VC + kv_offsets, mask=col_ok[:, None], other=0.0).to(tl.float32)
        acc = tl.dot(p, vc, acc * alpha[:, None], input_precision=COARSE_PRECISION)
        m_i = m_new
    if SPLITS == 1:
        coarse = acc / l_i[:, None]
        tl.store(COARSE + means + rows[:, None] * HEAD_DIM + offs_d[None, :], coarse, mask=row_ok[:, None])
    else:  # a split without key tiles (tiny T) leaves max -inf, sum 0, output 0: the combine weighs it 0
        part = COARSE + ((bh * SPLITS + tl.program_id(2)) * num_tiles + rows) * (HEAD_DIM + 2)
        tl.store(part[:, None] + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(part + HEAD_DIM, m_i, mask=row_ok)
        tl.store(part + HEAD_DIM + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(
    PARTS,  # fp32 [B*N, SPLITS, T, D + 2]: _coarse_kernel's per-split outputs, running maxima and sums
    COARSE,  # fp32 [B*N, T, D] out
    num_tiles,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The coarse output from the splits: sum_s exp(m_s - m) acc_s / sum_s exp(m_s - m) l_s, m = max_s m_s."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_tiles
    splits = tl.arange(0, SPLITS)
    part = PARTS + ((bh * SPLITS + splits[:, None]) * num_tiles + rows[None, :]) * (HEAD_DIM + 2)  # [SPLITS, R]
    m_s = tl.load(part + HEAD_DIM, mask=row_ok[None, :], other=0.0)
    l_s = tl.load(part + HEAD_DIM + 1, mask=row_ok[None, :], other=0.0)
    m = tl.max(m_s, 0)
    w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m[None, :]))
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part[:, :, None] + offs_d[None, None, :], mask=row_ok[None, :, None], other=0.0)
    total = tl.where(row_ok, tl.sum(w * l_s, 0), 1.0)  # pad rows: no 0 / 0
    coarse = tl.sum(acc * w[:, :, None], 0) / total[:, None]
    out = COARSE + (bh * num_tiles + rows[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(out, coarse, mask=row_ok[:, None])


@triton.jit
def _radix_step(key, threshold, count_at, shift, topk, RADIX_BITS: tl.constexpr):
    """One counting pass of the radix select over keys [ROWS, C]: raise each row's threshold by the highest of the
    RADIX_BITS bits at ``shift`` that keeps count(key >= threshold) >= topk; returns (threshold, count_at)."""
    one = tl.full((), 1, tl.uint32)
    if RADIX_BITS == 1:
        candidate = threshold | (one << shift)
        count = tl.sum((key >= candidate[:, None]).to(tl.int32), 1)
        threshold = tl.where(count >= topk, candidate, threshold)
        count_at = tl.where(count >= topk, count, count_at)
    else:  # bits (shift + 1, shift): three candidates counted in 21-bit fields of one int64 sum
        c1 = threshold | (one << shift)
        c2 = threshold | ((one + one) << shift)
        c3 = c1 | c2
        packed = ((key >= c1[:, None]).to(tl.int64) + ((key >= c2[:, None]).to(tl.int64) << 21)
                  + ((key >= c3[:, None]).to(tl.int64) << 42))
        counts = tl.sum(packed, 1)
        n1 = (counts & 0x1FFFFF).to(tl.int32)
        n2 = ((counts >> 21) & 0x1FFFFF).to(tl.int32)
        n3 = (counts >> 42).to(tl.int32)
        threshold = tl.where(n3 >= topk, c3, tl.where(n2 >= topk, c2, tl.where(n1 >= topk, c1, threshold)))
        count_at = tl.where(n3 >= topk, n3, tl.where(n2 >= topk, n2, tl.where(n1 >= topk, n1, count_at)))
    return threshold, count_at


@triton.jit
def _select_kernel(
    SCORES,  # fp32 [G, R, C]: G groups (e.g. B*N) of R score rows over C key tiles, contiguous
    OUT,  # int32 [G, R, topk] out: selected columns per row, ascending
    num_rows, num_cols, topk,
    TILE_OFFSETS, SPANS,  # with WRITE_SPANS: int32 [C + 1] in, int32 [G, R, topk] out (start << 7 | length)
    C_PAD: tl.constexpr,  # next power of two >= num_cols
    WRITE_SPANS: tl.constexpr,
    ROWS: tl.constexpr = 1,  # score rows per program
    RADIX_BITS: tl.constexpr = 1,  # key bits decided per counting pass: 1 (32 passes) or 2 (16, three counts each)
    EARLY_EXIT: tl.constexpr = True,  # stop once every row's count at its threshold is exactly topk
    FULL_TILE: tl.constexpr = _TILE_TOKENS,
):
    """ROWS score rows per program: the topk largest of each, ties to the lower column (== a stable descending sort).

    The k-th largest score is found exactly by a bitwise search on order-preserving uint32 keys (a radix
    select: the largest threshold t with count(key >= t) >= topk); then every score above it is taken, and of
    those equal to it the lowest-indexed ones fill the remaining slots; a cumulative count gives each selected
    column its ascending slot. With RADIX_BITS=2 a pass counts three candidates at once, packed in 21-bit
    fields of one int64 sum (a row has fewer than 2**21 columns).
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows = tl.program_id(1).to(tl.int64) * num_rows + rows
    cols = tl.arange(0, C_PAD)
    ok = row_ok[:, None] & (cols < num_cols)[None, :]
    s = tl.load(SCORES + rows[:, None] * num_cols + cols[None, :], mask=ok, other=0.0)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 == +0.0: one key for both
    bits = s.to(tl.uint32, bitcast=True)
    sign = tl.full((), 0x80000000, tl.uint32)
    key = tl.where((bits & sign) != 0, ~bits, bits | sign)  # uint32 order == float order (NaN on top)
    key = tl.where(ok, key, 0)  # pad columns: below every real score, never selected
    # The largest t with count(key >= t) >= topk is the k-th largest key: decided bit by bit from the top.
    threshold = tl.zeros([ROWS], dtype=tl.uint32)
    count_at = tl.full([ROWS], -1, tl.int32)  # count(key >= threshold), once a candidate was accepted
    if EARLY_EXIT:  # a row is settled once count(key >= t) == topk: exactly the keys >= t are taken, whatever the
        # lower bits; random scores get there after about log2(C) + a few bits, ties run all 32
        bit = 32 - RADIX_BITS
        pending = ROWS
        while (bit >= 0) & (pending > 0):
            threshold, count_at = _radix_step(key, threshold, count_at, bit.to(tl.uint32), topk, RADIX_BITS)
            pending = tl.sum(((count_at != topk) & row_ok).to(tl.int32), 0)
            bit -= RADIX_BITS
    else:
        for bit in tl.static_range(32 - RADIX_BITS, -1, -RADIX_BITS):
            threshold, count_at = _radix_step(key, threshold, count_at, bit, topk, RADIX_BITS)
    above = key > threshold[:, None]
    tied = (key == threshold[:, None]) & ok  # a pad row's keys all tie with its threshold 0: never taken
    slots_left = topk - tl.sum(above.to(tl.int32), 1)
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= slots_left[:, None]))
    slot = tl.cumsum(take.to(tl.int32), 1) - 1
    out = rows[:, None] * topk + slot
    tl.store(OUT + out, cols[None, :] + tl.zeros([ROWS, C_PAD], dtype=tl.int32), mask=take)
    if WRITE_SPANS:  # whole tiles first (each fills a packed key block alone), then partial ones
        start = tl.load(TILE_OFFSETS + cols[None, :], mask=take, other=0)
        length = tl.load(TILE_OFFSETS + cols[None, :] + 1, mask=take, other=0) - start
        whole = take & (length == FULL_TILE)
        part = take & (length != FULL_TILE)
        span_slot = tl.where(whole, tl.cumsum(whole.to(tl.int32), 1) - 1,
                             tl.sum(whole.to(tl.int32), 1)[:, None] + tl.cumsum(part.to(tl.int32), 1) - 1)
        tl.store(SPANS + rows[:, None] * topk + span_slot, (start << 7) | length, mask=take)


def vsa_tile_means(tensors: tuple[torch.Tensor, ...], tile_offsets: torch.Tensor, num_tiles: int,
                   num_warps: int = 2, heads_per_program: int = 1) -> torch.Tensor:
    """Per-tile means of 1 to 3 tensors (q, k, v) in ONE launch: [len(tensors), B, N, T, D] in their dtype.

    Each tensor: [B, N, S, D] in compact tile order, D contiguous, all of one shape and dtype (copied to
    contiguous when their strides differ). fp32 accumulation over each tile's real tokens, then rounded;
    one read of each input, no padded copy; equals ``attention.vsa._tile_means`` (the torch spec).
    num_warps 2: 0.16 / 0.84 ms at Wan-1.3B / 14B, against 0.19 / 1.06 with 4 and 0.28 / 1.77 with 8 (one warp
    measured the same as two).
    """
    _check_power_of_two("heads_per_program", heads_per_program)
    if not 1 <= len(tensors) <= 3:
        raise ValueError(f"vsa_tile_means takes 1 to 3 tensors, got {len(tensors)}")
    first = tensors[0]
    if first.stride(-1) != 1 or any(x.stride() != first.stride() for x in tensors):
        tensors = tuple(x.contiguous() for x in tensors)
        first = tensors[0]
    batch, heads, _, head_dim = first.shape
    out = torch.empty(len(tensors), batch, heads, num_tiles, head_dim, device=first.device, dtype=first.dtype)
    xs = (*tensors, *(first,) * (3 - len(tensors)))  # unused slots are never read
    _tile_means_kernel[(num_tiles, batch * triton.cdiv(heads, heads_per_program), len(tensors))](
        *xs, out, *first.stride()[:3], tile_offsets, heads, num_tiles, out[0].numel(),
        HEAD_DIM=head_dim, BLOCK_M=_TILE_TOKENS, HEADS=heads_per_program, num_warps=num_warps,
    )
    return out


# The coarse GEMMs are tiny ([T, T] x D per head): parallelism and registers decide. Measured (scores + coarse +
# top-k, two runs): 0.173-0.178 / 1.74-1.99 ms at Wan-1.3B / 14B with 32x32 blocks and
# 4 warps; 64x64 blocks spill (0.205-0.233 / 2.30-2.54 ms). Plain tf32 for P @ v_c: the same at 1.3B, 0.33 ms
# faster at 14B, but 3e-4 relative error on the coarse output against 2e-7 with 3xTF32 (kept: the spec's fp32).
_COARSE_CONFIG = dict(BLOCK_Q=32, BLOCK_K=32, COARSE_PRECISION="tf32x3", num_warps=4)


def vsa_select_from_means(
    q_c_BNTD: torch.Tensor, k_c_BNTD: torch.Tensor, v_c_BNTD: torch.Tensor, topk: int,
    tile_offsets: torch.Tensor | None = None, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The coarse stage from tile means in two launches: ``(block_index int32 [B, N, T, topk], coarse fp32
    [B, N, T, D], key_spans)``; the first two are the Triton equivalent of
    ``attention.vsa.select_from_tile_means``. With ``tile_offsets`` (int32 [T + 1]), ``key_spans`` holds each
    selected tile's packed span for ``vsa_fine_attention(key_spans=...)`` (whole tiles first), else None.

    Scores are fp32 dot products of the (rounded) means, so they equal the spec's up to summation order;
    the selection of a row is then exactly the spec's on those scores (ties to the lower tile index,
    indices ascending). The only [T, T] tensor is one fp32 score buffer; the coarse output's softmax runs
    online in the first kernel, and top-k is a radix select in registers in the second.
    ``config`` overrides ``_COARSE_CONFIG`` (benchmarks).
    """
    if k_c_BNTD.shape != q_c_BNTD.shape or v_c_BNTD.shape != q_c_BNTD.shape or q_c_BNTD.dim() != 4:
        raise ValueError("vsa_select_from_means: q_c, k_c, v_c must share one [B, N, T, D] shape")
    batch, heads, num_tiles, head_dim = q_c_BNTD.shape
    if tile_offsets is not None and tile_offsets.shape != (num_tiles + 1,):
        raise ValueError(f"vsa_select_from_means: tile_offsets must have num_tiles + 1 = {num_tiles + 1} entries")
    q_c, k_c, v_c = (x.contiguous() for x in (q_c_BNTD, k_c_BNTD, v_c_BNTD))
    device = q_c.device
    scores = torch.empty(batch * heads, num_tiles, num_tiles, device=device, dtype=torch.float32)
    coarse = torch.empty(batch, heads, num_tiles, head_dim, device=device, dtype=torch.float32)
    interpret = _INTERPRET or not q_c.is_cuda
    dot_in_fp32 = interpret and q_c.dtype == torch.bfloat16
    exact = interpret or q_c.dtype == torch.float32
    config = {**_COARSE_CONFIG, **(config or {})}
    if interpret:
        config["COARSE_PRECISION"] = "ieee"
    block_q = config.pop("BLOCK_Q")
    splits = config.setdefault("SPLITS", 1)
    _check_power_of_two("SPLITS", splits)
    parts = coarse if splits == 1 else torch.empty(batch * heads, splits, num_tiles, head_dim + 2, device=device,
                                                   dtype=torch.float32)
    _coarse_kernel[(triton.cdiv(num_tiles, block_q), batch * heads, splits)](
        q_c, k_c, v_c, scores, parts, num_tiles, 1.0 / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_Q=block_q, SCORE_PRECISION="ieee" if exact else "tf32",
        DOT_IN_FP32=dot_in_fp32, **config,
    )
    if splits > 1:
        _combine_kernel[(triton.cdiv(num_tiles, 16), batch * heads)](
            parts, coarse, num_tiles, HEAD_DIM=head_dim, SPLITS=splits, BLOCK_R=16, num_warps=4)
    block_index, spans = _topk(scores.view(batch, heads, num_tiles, num_tiles), topk, None, tile_offsets)
    return block_index, coarse, spans


def _select_warps(c_pad: int) -> int:
    """Warps per score row for the early-stopping search (the default), measured on an H100 (`python
    bench/attention.py --sparsity 0.9 --sla-topk --coarse`, CUDA graphs): 1,024 columns at Wan-1.3B 0.073 ms
    with 2 warps (1: 0.082, 4: 0.077; all 32 passes with 2 warps: 0.104); 2,048 columns at Wan-14B 1.085 ms with 4
    warps (1: 1.502, 2: 1.339; all 32 passes with 2 warps: 1.731)."""
    return 2 if c_pad <= 1024 else min(16, c_pad // 512)


def vsa_topk_lower_index_wins(scores: torch.Tensor, topk: int, num_warps: int | None = None,
                              config: dict | None = None) -> torch.Tensor:
    """Triton equivalent of ``attention.vsa._topk_lower_index_wins`` on fp32 scores [..., R, C]:
    the ``topk`` largest per row, ties to the lower index, as int32 [..., R, topk] in ascending order.
    One launch; exactly equal to the torch spec on the same scores. ``num_warps`` per program: default by width;
    ``config`` (benchmarks, tests): ``ROWS``, ``RADIX_BITS``, ``EARLY_EXIT`` (see ``_select_kernel``)."""
    return _topk(scores, topk, num_warps, None, config)[0]


def _topk(
    scores: torch.Tensor, topk: int, num_warps: int | None, tile_offsets: torch.Tensor | None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(block_index, key spans): with ``tile_offsets`` the same launch also writes each selected tile's packed
    span ``start << 7 | length`` for the fine kernel (None when the token count may not fit in 24 bits)."""
    num_rows, num_cols = scores.shape[-2:]
    # the early stop (about log2(C) + a few of the 32 passes on untied scores): 0.104 -> 0.073 ms at Wan-1.3B
    config = {"ROWS": 1, "RADIX_BITS": 1, "EARLY_EXIT": True, **(config or {})}
    _check_power_of_two("ROWS", config["ROWS"])
    if config["RADIX_BITS"] not in (1, 2):
        raise ValueError(f"RADIX_BITS must be 1 or 2 (key bits per counting pass), got {config['RADIX_BITS']!r}")
    if not 1 <= topk <= num_cols:
        raise ValueError(f"topk must lie in [1, {num_cols}], got {topk}")
    scores = scores.contiguous()
    block_index = torch.empty(*scores.shape[:-1], topk, device=scores.device, dtype=torch.int32)
    spans = None
    if tile_offsets is not None and num_cols * _TILE_TOKENS < 2**24:  # start << 7 stays below 2**31
        spans = torch.empty_like(block_index)
    c_pad = triton.next_power_of_2(num_cols)
    groups = scores.numel() // max(1, num_rows * num_cols)
    _select_kernel[(triton.cdiv(num_rows, config["ROWS"]), groups)](
        scores, block_index, num_rows, num_cols, topk,
        tile_offsets if spans is not None else block_index, spans if spans is not None else block_index,
        C_PAD=c_pad, WRITE_SPANS=spans is not None,
        num_warps=num_warps or min(16, _select_warps(c_pad) * config["ROWS"]), **config,
    )
    return block_index, spans


def _check_power_of_two(name: str, value) -> None:
    """Block counts of the coarse kernels become tl.arange extents: a positive power of two."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")
