"""The fine stage of VSA for Hopper in Gluon (Triton's explicit-layout dialect): load mode 3 of vsa_triton.

Same contract as ``vsa_triton._vsa_fine_kernel`` with packed key spans and TMA views, with a schedule the Triton
compiler does not produce (measured in ``bench/attention.py --variants``):
- Warp specialisation: one producer warp issues every TMA load (Q, the K/V ring, the gate) and refills a ring
  slot as soon as the consumer warpgroup releases it. The consumer's loop then holds no load instruction, no
  global load of a span and none of the CTA barriers the compiler puts around TMA issue.
- Packed key blocks: the selected tiles' real tokens stream through the ring in 16-row TMA boxes, four to a
  64-row key block, so partial tiles share blocks instead of each padding one (a whole tile at a block start
  moves as one 64-row box). The producer writes which rows of a slot are real keys beside the slot, and the
  consumer masks the rest. Random inputs select partial tiles often: 40.5 blocks instead of 63 tiles per query
  tile at Wan-1.3B / 0.9, and 1.51-1.69 ms against 2.11 with a block per tile (an earlier form of this kernel);
  24.5-24.7 against 35.5 ms at 14B. On a uniform draw of tiles (52.2 blocks), 1.89 against 2.28 ms with a 64-row
  box per tile (``python bench/attention.py --variants`` prints both draws).
- Iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back and waits only for S_j
  (FlashAttention-3's order); ptxas still moves the second wait ahead of the exponentials, so the overlap
  inside one program is partial. Q is the register operand of Q K^T, so its buffer takes the gate tile early.
- Q + 3 K/V stages are 113 KiB of shared memory and 128 registers per thread at launch (the consumer takes
  216 of them with setmaxnreg): two programs per SM, so one's softmax overlaps the other's products.

What bounds it (``probe`` builds, ``python bench/attention.py --sparsity 0.9 --variants``, H200, CUDA-graph
timings on the same spans): at Wan-1.3B / 0.9 the full kernel takes 1.28 ms, its key stream alone ("loads": the
same TMA copies, no arithmetic) 1.06 ms and its arithmetic alone ("math": no copies) 1.16 ms; at 14B 24.8 / 17.3 /
17.9 ms (with int8 key flags and a select instead of the additive bias: 1.30 / 1.06 / 1.23 and 25.1 / 17.3 /
18.9 ms). The key stream moves 9.86 GB (163 GB at 14B) at 9.2-9.4 TB/s whatever the ring depth (2, 3 or 6 stages:
1.07 / 1.06 / 1.11 ms), the L2's rate for these reads, so 1.06 ms is this kernel's floor at 1.3B / 0.9 unless
fewer key bytes move. In the compiled loop (sm_90 SASS from triton 3.9's ptxas 13.4, the CPU compile check's;
the GPU runs triton 3.6 with an older ptxas) ptxas places the wait for P_{j-1} V_{j-1} before the exponentials
(SASS: ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` right after the wait for S_j): the softmax overlaps the other
program's products, not this one's. Converting P before that wait, passing it through the wait, alternating two
P register sets, or carrying O across steps with waits that leave one product in flight did not move it (the
last makes ptxas serialise every wgmma: "non wgmma instructions reading accumulator registers").

Only for compute capability 9.x, 16-bit inputs, D = 128 and layouts with TMA views (``vsa_triton._gluon_views``
checks); everything else takes the Triton kernel. Gluon has no interpreter: the GPU tests check this kernel
against the torch spec, and a CPU test compiles it for sm_90 and checks its resource use.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon is in triton >= 3.5; without it the Triton kernel serves every device
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Gluon is experimental and renames things: triton 3.6 has gl.thread_barrier and tma.async_copy_*,
    # triton 3.9 gl.barrier and tma.async_load / async_store
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

from tessera.attention.vsa_triton import _TILE_TOKENS as BLOCK  # noqa: E402  (query rows per program, key rows per step)

STAGES = 3  # K/V ring depth: block j + 2 loads while block j is processed
ROW_BOX = 16  # rows per TMA box of the packed key stream (32: 1.87 / 29.1 ms against 1.69 / 24.7 at 16)
# registers per thread of the TMA warp; the consumer warpgroup gets the rest of MAX_REGS (216). 24 measured
# -3% / +1% at Wan-1.3B / 14B: noise, so the tutorial-safe 40 stays.
PRODUCER_REGS = gl.constexpr(40) if HAVE_GLUON else 40
MAX_REGS = 128  # per thread at launch: 2 programs of 4 + 4 warps (the TMA warp counts as a warpgroup) per SM


if HAVE_GLUON:

    @gluon.jit
    def _num_blocks(index_row, topk, BLOCK_N: gl.constexpr, ROW_BOX: gl.constexpr, layout: gl.constexpr):
        """How many BLOCK_N-row key blocks the packed stream of this row's spans fills: every span takes
        ceil(length / ROW_BOX) boxes, BLOCK_N // ROW_BOX boxes to a block. Producer and consumer each count for
        themselves (one cached read of the row), so no barrier hands the count over."""
        chunk: gl.constexpr = layout.size_per_thread[0] * layout.threads_per_warp[0] * layout.warps_per_cta[0]
        boxes = topk * 0
        for c in range(0, topk, chunk):
            offs = c + gl.arange(0, chunk, layout=layout)
            length = gl.load(index_row + offs, mask=offs < topk, other=0) & 127
            boxes += gl.sum((length + ROW_BOX - 1) // ROW_BOX, 0)
        per_block: gl.constexpr = BLOCK_N // ROW_BOX
        return (boxes + per_block - 1) // per_block

    @gluon.jit
    def _load_packed_block(k_desc, v_desc, kb_desc, vb_desc, k_smem, v_smem, bias_smem, k_bars, v_bars, slot,
                           row0, col0, index_row, topk, si, off, entry, ROW_BOX: gl.constexpr,
                           ISSUE: gl.constexpr):
        """Fills ring slot ``slot`` from the packed key stream: the ROW_BOX-row boxes of the selected tiles, in
        span order, BLOCK_N // ROW_BOX to a block, so partial tiles share blocks instead of each padding one to
        BLOCK_N rows. (si, off, entry): the stream cursor (span index, token offset in it, the span). A whole
        tile at a block start moves as one BLOCK_N-row box. bias_smem[slot] gets 0 for each real key row, -inf
        for the others (the scores' additive mask).
        ISSUE False (the ``math`` probe): no copy is issued and the slot's barriers are arrived on at once."""
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        per_block: gl.constexpr = BLOCK_N // ROW_BOX
        bias_layout: gl.constexpr = gl.BlockedLayout([BLOCK_N // 32], [32], [1], [0])
        cols = gl.arange(0, BLOCK_N, layout=bias_layout)
        real = gl.full([BLOCK_N], 0.0, bias_smem.dtype, bias_layout)
        pad = gl.full([BLOCK_N], float("-inf"), bias_smem.dtype, bias_layout)
        k_bar, v_bar = k_bars.index(slot), v_bars.index(slot)
        if (off == 0) & ((entry & 127) == BLOCK_N):
            row = row0 + (entry >> 7)
            if ISSUE:
                _tma_load(k_desc, [row, col0], k_bar, k_smem.index(slot))
                _tma_load(v_desc, [row, col0], v_bar, v_smem.index(slot))
            bias = real
            boxes = per_block
            si += 1
            entry = gl.load(index_row + si, mask=si < topk, other=0)
        else:
            bias = pad
            boxes = 0
            for r in gl.static_range(per_block):
                length = entry & 127
                count = gl.minimum(length - off, ROW_BOX)
                if si < topk:
                    row = row0 + (entry >> 7) + off
                    if ISSUE:
                        _tma_load(kb_desc, [row, col0], k_bar,
                                  k_smem.index(slot).slice(r * ROW_BOX, ROW_BOX, dim=0))
                        _tma_load(vb_desc, [row, col0], v_bar,
                                  v_smem.index(slot).slice(r * ROW_BOX, ROW_BOX, dim=0))
                    bias = gl.where((cols // ROW_BOX == r) & (cols % ROW_BOX < count), real, bias)
                    boxes += 1
                    off += ROW_BOX
                    if off >= length:
                        si += 1
                        off = 0
                        entry = gl.load(index_row + si, mask=si < topk, other=0)
        bias_smem.index(slot).store(bias)
        _cta_barrier()  # the warp's bias stores before the arrivals below (bar.warp.sync orders memory)
        # the arrivals come after the copies: the transaction count may dip below zero until they land
        if ISSUE:
            for count in gl.static_range(1, per_block + 1):  # expect takes a constant byte count
                mbarrier.expect(k_bar, kb_desc.block_type.nbytes * count, pred=boxes == count)
                mbarrier.expect(v_bar, vb_desc.block_type.nbytes * count, pred=boxes == count)
        else:
            mbarrier.arrive(k_bar, count=1)
            mbarrier.arrive(v_bar, count=1)
        return si, off, entry

    @gluon.jit
    def _softmax_step(s, bias, m_i, l_i, qk_scale):
        """Online-softmax update for one key block's scores (exp2 domain): p, the new m_i and l_i, and alpha.
        bias: 0 on the block's real key columns, -inf on the others, added to every block (one add per score,
        where a select on int8 flags compiled to six instructions a score: 447 -> 390 in the loop)."""
        s = s + bias[None, :]
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)  # finite: every block holds >= 1 real key
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        return p, m_new, l_i * alpha + gl.sum(p, 1), alpha

    @gluon.jit
    def _producer(descs, bufs, bars, index_row, topk, row0, col0, q_start, HAS_GATE: gl.constexpr,
                  ROW_BOX: gl.constexpr, PROBE: gl.constexpr):
        """One warp: every TMA load of the program. Q, then the K/V ring (a slot is refilled once the consumer
        has released it), then the gate into Q's buffer once the consumer holds Q in registers."""
        q_desc, k_desc, v_desc, g_desc, kb_desc, vb_desc = descs
        q_smem, k_smem, v_smem, bias_smem = bufs
        q_bar, q_free, k_bars, v_bars, empty_bars = bars
        stages: gl.constexpr = k_smem.shape[0]
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [row0 + q_start, col0], q_bar, q_smem)
        n_blocks = _num_blocks(index_row, topk, k_smem.shape[1], ROW_BOX, gl.BlockedLayout([2], [32], [1], [0]))
        si = topk * 0  # the stream cursor: span index, token offset in the span, the span
        off = topk * 0
        entry = gl.load(index_row)
        for i in range(n_blocks):
            slot = i % stages
            mbarrier.wait(empty_bars.index(slot), ((i // stages) & 1) ^ 1)  # passes at once in the first round
            si, off, entry = _load_packed_block(k_desc, v_desc, kb_desc, vb_desc, k_smem, v_smem, bias_smem,
                                                k_bars, v_bars, slot, row0, col0, index_row, topk, si, off,
                                                entry, ROW_BOX, PROBE != 2)
        if HAS_GATE:
            mbarrier.wait(q_free, 0)
            fence_async_shared()
            mbarrier.expect(q_bar, g_desc.block_type.nbytes)
            _tma_load(g_desc, [row0 + q_start, col0], q_bar, q_smem)

    @gluon.jit
    def _consumer(bufs, bars, out_args, index_row, topk, qk_scale, HAS_GATE: gl.constexpr, ROW_BOX: gl.constexpr,
                  PROBE: gl.constexpr, num_warps: gl.constexpr):
        """One warpgroup: the online softmax over the key blocks, then the gated coarse term and the store.
        Iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back and waits only for S_j.
        PROBE 1 (``loads``): wait for each block's copies and release the slot, no arithmetic (output zero)."""
        q_smem, k_smem, v_smem, bias_smem = bufs
        q_bar, q_free, k_bars, v_bars, empty_bars = bars
        o_desc, COARSE, coarse_off, out_row, out_col, out_base, stride_os, q_start, q_len = out_args
        stages: gl.constexpr = k_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[0]
        HEAD_DIM: gl.constexpr = q_smem.shape[1]
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)

        n_blocks = _num_blocks(index_row, topk, BLOCK_M, ROW_BOX, gl.BlockedLayout([1], [32], [num_warps], [0]))
        mbarrier.wait(q_bar, 0)
        q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        fence_async_shared()
        mbarrier.arrive(q_free, count=1)  # Q's buffer may take the gate tile

        s_zero = gl.zeros([BLOCK_M, BLOCK_M], gl.float32, s_layout)  # shape carrier: use_acc=False
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))

        if PROBE == 1:
            for j in range(n_blocks):
                slot = j % stages
                mbarrier.wait(k_bars.index(slot), (j // stages) & 1)
                mbarrier.wait(v_bars.index(slot), (j // stages) & 1)
                mbarrier.arrive(empty_bars.index(slot), count=1)
            out = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        else:
            # Key block 0: scores and the first softmax; nothing to overlap yet.
            mbarrier.wait(k_bars.index(0), 0)
            s_tok = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            bias = bias_smem.index(0).load(s_cols).to(gl.float32)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            p, m_i, l_i, alpha = _softmax_step(s, bias, m_i, l_i, qk_scale)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_blocks):
                slot = j % stages
                prev = (j - 1) % stages
                mbarrier.wait(k_bars.index(slot), (j // stages) & 1)
                s_tok = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                bias = bias_smem.index(slot).load(s_cols).to(gl.float32)  # written before the arrivals
                # rescale O (by block j-1's alpha) while Q K_j^T runs, so only P's conversion waits for P V: 3-5%
                acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
                mbarrier.wait(v_bars.index(prev), ((j - 1) // stages) & 1)
                o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_tok])  # S_j is ready; P_{j-1} V_{j-1} may still run
                p, m_i, l_i, alpha = _softmax_step(s, bias, m_i, l_i, qk_scale)
                acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])
                mbarrier.arrive(empty_bars.index(prev), count=1)  # both products of slot prev are done
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            last = n_blocks - 1
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            mbarrier.wait(v_bars.index(last % stages), (last // stages) & 1)
            o_tok = warpgroup_mma(p_op, v_smem.index(last % stages), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[o_tok])

            out = acc * gl.convert_layout(1.0 / l_i, o_rows)[:, None]
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        if HAS_GATE:
            mbarrier.wait(q_bar, 1)
            gate = q_smem.load(o_layout).to(gl.float32)
            # loaded in the columns' layout (each thread its own, cached): no shared-memory conversion
            coarse = gl.load(COARSE + coarse_off + offs_d)
            out = out + gate * coarse.to(gl.float32)[None, :]
        out = out.to(dtype)
        if q_len == BLOCK_M:  # a full tile: one TMA store from shared memory
            _cta_barrier()  # every warp has read the gate out of q_smem
            q_smem.store(out)
            fence_async_shared()
            _tma_store(o_desc, [out_row, out_col], q_smem)
            tma.store_wait(0)
        else:  # a partial tile: masked stores, rows past it belong to the next tile
            rows = q_start + gl.arange(0, BLOCK_M, layout=o_rows)
            gl.store(out_base + (rows * stride_os)[:, None] + offs_d[None, :], out,
                     mask=(rows < q_start + q_len)[:, None])

    @gluon.jit
    def _vsa_fine_gluon_kernel(
        q_desc, k_desc, v_desc, g_desc, o_desc,  # TMA descriptors of the 2D row views (g_desc: gate or q)
        kb_desc, vb_desc,  # K and V again with ROW_BOX-row blocks
        OUT, COARSE,  # pointers: OUT for partial query tiles, COARSE [B*N, T, D]
        stride_ob, stride_on, stride_os,
        desc_row_b, desc_row_n, desc_col_n, desc_col_b,  # q, k, v, gate: row/column of (b, n, token 0) in the 2D views
        out_row_b, out_row_n, out_col_n, out_col_b,  # the same for the output's view
        TILE_OFFSETS, SPANS,  # int32 [T + 1]; int32 [B*N, T, topk] packed key spans
        COARSE_STRIDE_BH, num_heads, num_tiles, topk, qk_scale,
        HAS_GATE: gl.constexpr, NUM_STAGES: gl.constexpr, ROW_BOX: gl.constexpr, PROBE: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
        dtype: gl.constexpr = q_desc.dtype
        tile_q = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // num_heads
        n = bh % num_heads
        q_start = gl.load(TILE_OFFSETS + tile_q)
        q_len = gl.load(TILE_OFFSETS + tile_q + 1) - q_start
        index_row = SPANS + (bh.to(gl.int64) * num_tiles + tile_q) * topk

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        # the scores' mask of each ring slot: 0 on real key rows, -inf elsewhere (the producer writes it before
        # its arrivals)
        bias_rows: gl.constexpr = triton.next_power_of_2(NUM_STAGES)  # power-of-2 shapes only
        bias_smem = gl.allocate_shared_memory(gl.bfloat16, [bias_rows, BLOCK_M],
                                              gl.SwizzledSharedLayout(1, 1, 1, [0]))
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_free, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
            mbarrier.init(empty_bars.index(i), count=1)
        # K and V rows the last block of a stream leaves unloaded keep old values: zeros at first, never NaN (a
        # NaN score would survive the additive -inf mask)
        zero_tile = gl.zeros([BLOCK_M, HEAD_DIM], dtype, gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0]))
        for i in gl.static_range(NUM_STAGES):
            k_smem.index(i).store(zero_tile)
            v_smem.index(i).store(zero_tile)
        _cta_barrier()
        fence_async_shared()

        # Rows past a partial query tile belong to the next tile (never stored) or lie past the tensor
        # (zero-filled); key rows of a box past its tile's end are masked to -inf, so p = 0 there.
        bufs = (q_smem, k_smem, v_smem, bias_smem)
        bars = (q_bar, q_free, k_bars, v_bars, empty_bars)
        out_args = (o_desc, COARSE, bh.to(gl.int64) * COARSE_STRIDE_BH + tile_q * HEAD_DIM,
                    b * out_row_b + n * out_row_n + q_start, b * out_col_b + n * out_col_n,
                    OUT + b.to(gl.int64) * stride_ob + n.to(gl.int64) * stride_on, stride_os, q_start, q_len)
        descs = (q_desc, k_desc, v_desc, g_desc, kb_desc, vb_desc)
        gl.warp_specialize([
            (_consumer, (bufs, bars, out_args, index_row, topk, qk_scale, HAS_GATE, ROW_BOX, PROBE, num_warps)),
            (_producer, (descs, bufs, bars, index_row, topk, b * desc_row_b + n * desc_row_n,
                         b * desc_col_b + n * desc_col_n,
                         q_start, HAS_GATE, ROW_BOX, PROBE)),
        ], [1], [PRODUCER_REGS])


_PROBES = {"": 0, "loads": 1, "math": 2}


def gluon_fine_supported(q: torch.Tensor) -> bool:
    """Whether the Gluon kernel serves q's device, dtype and head dim (the views are checked by the caller)."""
    return (HAVE_GLUON and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == 128
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def launch_gluon_fine(views, out_view, out: torch.Tensor, tile_offsets: torch.Tensor, spans: torch.Tensor,
                      coarse: torch.Tensor | None, gate_view, qk_scale: float, stages: int = STAGES,
                      row_box: int = ROW_BOX, probe: str = "") -> torch.Tensor:
    """views: (2D row view, row_b, row_n, col_n, col_b) of q, k, v (``vsa_triton._host_desc_view``, one shared
    geometry); gate_view the gate's (or None);
    out_view the output's. spans: int32 [B, N, T, topk] packed key spans, in any order (whole tiles first wastes
    the fewest boxes). row_box: rows per box of the key stream (16, 32 or 64, the sizes the GPU tests check; 64
    gives every partial tile a block of its own). probe (``bench/attention.py --variants``, the output is then not
    attention): "loads" streams the same key blocks through the ring with no arithmetic, "math" does all the
    arithmetic on whatever the ring holds without copying keys, the two bounds of the full kernel's time.
    Writes out and returns it."""
    if row_box not in (16, 32, 64):
        raise ValueError(f"launch_gluon_fine: row_box must be 16, 32 or 64, got {row_box}")
    if probe not in _PROBES:
        raise ValueError(f"launch_gluon_fine: probe must be one of {list(_PROBES)}, got {probe!r}")
    batch, heads, _, head_dim = out.shape
    num_tiles, topk = spans.shape[2], spans.shape[3]
    if any(view[1:] != views[0][1:] for view in (*views[1:], *((gate_view,) if gate_view else ()))):
        raise ValueError("launch_gluon_fine: q, k, v and the gate must share one layout")
    gl_dtype = gl.bfloat16 if out.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK, head_dim], gl_dtype)
    descs = [TensorDescriptor.from_tensor(view[0], [BLOCK, head_dim], layout) for view in views]
    g_desc = TensorDescriptor.from_tensor(gate_view[0], [BLOCK, head_dim], layout) if gate_view else descs[0]
    o_desc = TensorDescriptor.from_tensor(out_view[0], [BLOCK, head_dim], layout)
    row_descs = [TensorDescriptor.from_tensor(view[0], [row_box, head_dim], layout) for view in views[1:]]
    has_gate = gate_view is not None
    _vsa_fine_gluon_kernel[(num_tiles, batch * heads)](
        *descs, g_desc, o_desc, *row_descs, out, coarse if has_gate else out, *out.stride()[:3], *views[0][1:],
        *out_view[1:], tile_offsets, spans, num_tiles * head_dim, heads, num_tiles, topk, qk_scale,
        HAS_GATE=has_gate, NUM_STAGES=stages, ROW_BOX=row_box, PROBE=_PROBES[probe], num_warps=4, maxnreg=MAX_REGS)
    return out
