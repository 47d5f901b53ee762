"""The fine stage of VSA for Hopper in Gluon (Triton's explicit-layout dialect): load mode 3 of vsa_triton.

Same contract as ``vsa_triton._vsa_fine_kernel`` with packed key spans and TMA views, with a schedule the Triton
compiler does not produce (measured in ``bench/attention.py --variants``):
- Warp specialisation: one producer warp issues every TMA load (Q, the K/V ring, the gate) and refills a ring
  slot as soon as the consumer warpgroup releases it. The consumer's loop then holds no load instruction, no
  global load of a span and none of the CTA barriers the compiler puts around TMA issue.
- A partial key tile moves only the 16-row boxes its real tokens need, not a whole 64-row box: 18% fewer
  K/V bytes at Wan-1.3B, where the loads alone took as long as the whole Triton kernel.
- Iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back and waits only for S_j
  (FlashAttention-3's order); ptxas still moves the second wait ahead of the exponentials, so the overlap
  inside one program is partial. Q is the register operand of Q K^T, so its buffer takes the gate tile early.
- Q + 3 K/V stages are 113 KiB of shared memory and 128 registers per thread at launch (the consumer takes
  216 of them with setmaxnreg): two programs per SM, so one's softmax overlaps the other's products.

Only for compute capability 9.x, 16-bit inputs, D = 128 and layouts with TMA views (``vsa_triton._gluon_serves``
checks); everything else takes the Triton kernel. Gluon has no interpreter: the GPU tests check this kernel
against the torch spec, and a CPU test compiles it for sm_90 and checks its resource use.
"""

from __future__ import annotations

import torch

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

from attention.vsa_triton import _TILE_TOKENS as BLOCK  # noqa: E402  (query rows per program, key rows per step)

STAGES = 3  # K/V ring depth: tile j + 2 loads while tile j is processed
ROW_BOX = 16  # rows per TMA box of a partial key tile
# registers per thread of the TMA warp; the consumer warpgroup gets the rest of MAX_REGS (216). 24 measured
# -3% / +1% at Wan-1.3B / 14B (session 3, device run 15): noise, so the tutorial-safe 40 stays.
PRODUCER_REGS = gl.constexpr(40) if HAVE_GLUON else 40
MAX_REGS = 128  # per thread at launch: 2 programs of 4 + 4 warps (the TMA warp counts as a warpgroup) per SM


if HAVE_GLUON:

    @gluon.jit
    def _load_key_tile(k_desc, v_desc, kb_desc, vb_desc, k_smem, v_smem, k_bars, v_bars, entry, slot, row0, col0,
                       ROW_BOX: gl.constexpr):
        """TMA loads of one key tile's K and V (entry: its packed span, start << 7 | length) into ring slot
        ``slot``: one box each for a full tile; with ROW_BOX > 0 a partial tile takes only the ROW_BOX-row boxes
        (kb_desc / vb_desc) its real tokens need."""
        row = row0 + (entry >> 7)
        k_len = entry & 127
        k_bar, v_bar = k_bars.index(slot), v_bars.index(slot)
        if k_len == k_smem.shape[1] or ROW_BOX == 0:
            mbarrier.expect(k_bar, k_desc.block_type.nbytes)
            _tma_load(k_desc, [row, col0], k_bar, k_smem.index(slot))
            mbarrier.expect(v_bar, v_desc.block_type.nbytes)
            _tma_load(v_desc, [row, col0], v_bar, v_smem.index(slot))
        else:
            boxes = (k_len + ROW_BOX - 1) // ROW_BOX
            for count in gl.static_range(1, k_smem.shape[1] // ROW_BOX + 1):  # expect takes a constant byte count
                mbarrier.expect(k_bar, kb_desc.block_type.nbytes * count, pred=boxes == count)
                mbarrier.expect(v_bar, vb_desc.block_type.nbytes * count, pred=boxes == count)
            for r in gl.static_range(k_smem.shape[1] // ROW_BOX):
                if r < boxes:
                    rows: gl.constexpr = r * ROW_BOX
                    _tma_load(kb_desc, [row + rows, col0], k_bar, k_smem.index(slot).slice(rows, ROW_BOX, dim=0))
                    _tma_load(vb_desc, [row + rows, col0], v_bar, v_smem.index(slot).slice(rows, ROW_BOX, dim=0))

    @gluon.jit
    def _softmax_step(s, entry, m_i, l_i, qk_scale, offs_n):
        """Online-softmax update for one key tile's scores (exp2 domain): p, the new m_i and l_i, and alpha.
        The mask applies to every tile: behind a branch for partial tiles only it measured 2% slower at 1.3B."""
        s = gl.where((offs_n < (entry & 127))[None, :], s, float("-inf"))  # columns past a partial key tile
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)  # finite: every tile owns >= 1 real token
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        return p, m_new, l_i * alpha + gl.sum(p, 1), alpha

    @gluon.jit
    def _producer(descs, bufs, bars, index_row, topk, row0, col0, q_start, HAS_GATE: gl.constexpr,
                  ROW_BOX: gl.constexpr):
        """One warp: every TMA load of the program. Q, then the K/V ring (a slot is refilled once the consumer
        has released it), then the gate into Q's buffer once the consumer holds Q in registers."""
        q_desc, k_desc, v_desc, g_desc, kb_desc, vb_desc = descs
        q_smem, k_smem, v_smem = bufs
        q_bar, q_free, k_bars, v_bars, empty_bars = bars
        stages: gl.constexpr = k_smem.shape[0]
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [row0 + q_start, col0], q_bar, q_smem)
        for i in range(topk):
            slot = i % stages
            mbarrier.wait(empty_bars.index(slot), ((i // stages) & 1) ^ 1)  # passes at once in the first round
            _load_key_tile(k_desc, v_desc, kb_desc, vb_desc, k_smem, v_smem, k_bars, v_bars,
                           gl.load(index_row + i), slot, row0, col0, ROW_BOX)
        if HAS_GATE:
            mbarrier.wait(q_free, 0)
            fence_async_shared()
            mbarrier.expect(q_bar, g_desc.block_type.nbytes)
            _tma_load(g_desc, [row0 + q_start, col0], q_bar, q_smem)

    @gluon.jit
    def _consumer(bufs, bars, out_args, index_row, topk, qk_scale, HAS_GATE: gl.constexpr,
                  num_warps: gl.constexpr):
        """One warpgroup: the online softmax over the selected key tiles, then the gated coarse term and the
        store. Iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back and waits only for S_j."""
        q_smem, k_smem, v_smem = bufs
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

        mbarrier.wait(q_bar, 0)
        q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        fence_async_shared()
        mbarrier.arrive(q_free, count=1)  # Q's buffer may take the gate tile

        offs_n = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        s_zero = gl.zeros([BLOCK_M, BLOCK_M], gl.float32, s_layout)  # shape carrier: use_acc=False
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))

        # Key tile 0: scores and the first softmax; nothing to overlap yet.
        mbarrier.wait(k_bars.index(0), 0)
        s_tok = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        p, m_i, l_i, alpha = _softmax_step(s, gl.load(index_row), m_i, l_i, qk_scale, offs_n)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        entry = gl.load(index_row + 1, mask=topk > 1, other=0)  # one step ahead: no step waits on it
        for j in range(1, topk):
            slot = j % stages
            prev = (j - 1) % stages
            next_entry = gl.load(index_row + j + 1, mask=j + 1 < topk, other=0)
            mbarrier.wait(k_bars.index(slot), (j // stages) & 1)
            s_tok = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            # rescale O (by tile j-1's alpha) while Q K_j^T runs, so only P's conversion waits for P V: 3-5%
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            mbarrier.wait(v_bars.index(prev), ((j - 1) // stages) & 1)
            o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=[s_tok])  # S_j is ready; P_{j-1} V_{j-1} may still run
            p, m_i, l_i, alpha = _softmax_step(s, entry, m_i, l_i, qk_scale, offs_n)
            acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])
            mbarrier.arrive(empty_bars.index(prev), count=1)  # both products of slot prev are done
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            entry = next_entry
        last = topk - 1
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        mbarrier.wait(v_bars.index(last % stages), (last // stages) & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(last % stages), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[o_tok])

        out = acc * gl.convert_layout(1.0 / l_i, o_rows)[:, None]
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        if HAS_GATE:
            mbarrier.wait(q_bar, 1)
            gate = q_smem.load(o_layout).to(gl.float32)
            vec: gl.constexpr = gl.BlockedLayout([HEAD_DIM // (32 * num_warps)], [32], [num_warps], [0])
            coarse = gl.load(COARSE + coarse_off + gl.arange(0, HEAD_DIM, layout=vec))  # one vector load
            out = out + gate * gl.convert_layout(coarse.to(gl.float32), gl.SliceLayout(0, o_layout))[None, :]
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
        desc_row_b, desc_row_n, desc_col_n,  # q, k, v, gate: row/column of (b, n, token 0) in the 2D views
        out_row_b, out_row_n, out_col_n,  # the same for the output's view
        TILE_OFFSETS, SPANS,  # int32 [T + 1]; int32 [B*N, T, topk] packed key spans
        COARSE_STRIDE_BH, num_heads, num_tiles, topk, qk_scale,
        HAS_GATE: gl.constexpr, NUM_STAGES: gl.constexpr, ROW_BOX: gl.constexpr, num_warps: gl.constexpr,
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
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_free, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
            mbarrier.init(empty_bars.index(i), count=1)
        if ROW_BOX > 0:  # V rows a partial tile leaves unloaded keep old values: zeros at first, never NaN
            zero_tile = gl.zeros([BLOCK_M, HEAD_DIM], dtype, gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0]))
            for i in gl.static_range(NUM_STAGES):
                v_smem.index(i).store(zero_tile)
            _cta_barrier()
        fence_async_shared()

        # Rows past a partial query tile belong to the next tile (never stored) or lie past the tensor
        # (zero-filled); key columns past a partial key tile are masked to -inf, so p = 0 there.
        bufs = (q_smem, k_smem, v_smem)
        bars = (q_bar, q_free, k_bars, v_bars, empty_bars)
        out_args = (o_desc, COARSE, bh.to(gl.int64) * COARSE_STRIDE_BH + tile_q * HEAD_DIM,
                    b * out_row_b + n * out_row_n + q_start, n * out_col_n,
                    OUT + b.to(gl.int64) * stride_ob + n.to(gl.int64) * stride_on, stride_os, q_start, q_len)
        descs = (q_desc, k_desc, v_desc, g_desc, kb_desc, vb_desc)
        gl.warp_specialize([
            (_consumer, (bufs, bars, out_args, index_row, topk, qk_scale, HAS_GATE, num_warps)),
            (_producer, (descs, bufs, bars, index_row, topk, b * desc_row_b + n * desc_row_n, n * desc_col_n,
                         q_start, HAS_GATE, ROW_BOX)),
        ], [1], [PRODUCER_REGS])


def gluon_fine_supported(q: torch.Tensor) -> bool:
    """Whether the Gluon kernel serves q's device, dtype and head dim (the views are checked by the caller)."""
    return (HAVE_GLUON and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == 128
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def launch_gluon_fine(views, out_view, out: torch.Tensor, tile_offsets: torch.Tensor, spans: torch.Tensor,
                      coarse: torch.Tensor | None, gate_view, qk_scale: float, stages: int = STAGES,
                      row_box: int = ROW_BOX) -> torch.Tensor:
    """views: (2D row view, row_b, row_n, col_n) of q, k, v (shared geometry); gate_view the gate's (or None);
    out_view the output's. spans: int32 [B, N, T, topk] packed key spans. Writes out and returns it."""
    batch, heads, _, head_dim = out.shape
    num_tiles, topk = spans.shape[2], spans.shape[3]
    if any(view[1:] != views[0][1:] for view in (*views[1:], *((gate_view,) if gate_view else ()))):
        raise ValueError("launch_gluon_fine: q, k, v and the gate must share one layout")
    gl_dtype = gl.bfloat16 if out.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK, head_dim], gl_dtype)
    descs = [TensorDescriptor.from_tensor(view[0], [BLOCK, head_dim], layout) for view in views]
    g_desc = TensorDescriptor.from_tensor(gate_view[0], [BLOCK, head_dim], layout) if gate_view else descs[0]
    o_desc = TensorDescriptor.from_tensor(out_view[0], [BLOCK, head_dim], layout)
    row_descs = [TensorDescriptor.from_tensor(view[0], [row_box or BLOCK, head_dim], layout) for view in views[1:]]
    has_gate = gate_view is not None
    _vsa_fine_gluon_kernel[(num_tiles, batch * heads)](
        *descs, g_desc, o_desc, *row_descs, out, coarse if has_gate else out, *out.stride()[:3], *views[0][1:],
        *out_view[1:], tile_offsets, spans, num_tiles * head_dim, heads, num_tiles, topk, qk_scale,
        HAS_GATE=has_gate, NUM_STAGES=stages, ROW_BOX=row_box, num_warps=4, maxnreg=MAX_REGS)
    return out
