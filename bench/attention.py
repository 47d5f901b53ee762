"""Attention micro-benchmark on one GPU: dense SDPA (cuDNN, flash) vs our VSA (fine kernel, full call) and SLA.

Run from the repo root:  python bench/attention.py --out bench_attention.json [--peer] [--sla-only]
                         [--inputs dit --shapes wan1.3b-480p]  (a DiT forward's own inputs, bench/dit_capture.py)
Shapes: Wan-1.3B 480p (grid 21x30x52, 12 heads) and Wan-14B 720p (grid 21x45x80, 40 heads), D=128, bf16, B=1.
Legend: B batch, N heads, S tokens, T tiles, K selected tiles, D head dim; SLA: Q query blocks, J selected key blocks.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import cuda_time_ms  # noqa: E402
from tessera import attention  # noqa: E402
from tessera.attention import sla_triton, vsa_coarse_triton, vsa_triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"wan1.3b-480p": ((21, 30, 52), 12), "wan14b-720p": ((21, 45, 80), 40)}
HEAD_DIM = 128


def time_ms(fn) -> float:
    """Median of 20 CUDA-event timings after 5 warm-up calls."""
    return cuda_time_ms(fn, warmup=5, iters=20)


def graph_ms(fn) -> float | None:
    """Median of 20 replays of fn captured in a CUDA graph: GPU time without the host's launch work (which an
    eager call exposes when its kernels take less time than launching them). None if fn cannot be captured."""
    try:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return cuda_time_ms(graph.replay, warmup=3, iters=20)
    except Exception as exc:  # noqa: BLE001 - a benchmark row, not a failure
        print(f"graph capture failed: {type(exc).__name__}: {exc}")
        return None


def queued_ms(fn, calls: int = 20) -> float:
    """Milliseconds per call of ``calls`` eager calls queued back to back (events around all, one sync): a loop's
    throughput, where the host prepares the next call while the GPU runs this one (as in a DiT forward)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def host_us(fn, calls: int = 50) -> float:
    """Host microseconds per eager call: the launch work, with the GPU kept busy enough not to stall it."""
    import time

    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU spin: the calls below only queue
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def masked_dense_rows(q, k, v, gate, coarse, metadata, block_index, query_tiles) -> torch.Tensor:
    """fp32 reference on a few query tiles: dense attention with the non-selected key tiles masked out."""
    offsets = metadata.tile_offsets.tolist()
    tid = metadata.token_tile_ids
    outs = []
    for t in query_tiles:
        rows = slice(offsets[t], offsets[t + 1])
        allowed = torch.zeros(q.shape[0], q.shape[1], metadata.num_tiles, dtype=torch.bool, device=q.device)
        allowed.scatter_(-1, block_index[:, :, t].long(), True)
        scores = q[:, :, rows].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed[:, :, tid][:, :, None, :], float("-inf"))
        out = scores.softmax(-1) @ v.float()
        if gate is not None:
            out = out + gate[:, :, rows].float() * coarse[:, :, t, None].float()
        outs.append(out)
    return torch.cat(outs, dim=2)


def check_correctness(results: dict) -> None:
    """Small shape with partial tiles: full VSA call vs the torch reference of attention/vsa.py."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    metadata = attention.build_vsa_metadata((6, 10, 13), 0.7, "cuda")
    S, N = metadata.total_seq_length, 4
    q, k, v, gate = (torch.randn(1, N, S, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
                     for _ in range(4))
    expected = attention.vsa_attention_reference(q.float(), k.float(), v.float(), gate.float(), metadata)
    got = attention.VSAAttention(metadata, impl="triton")(q, k, v, gate)
    err = ((got.float() - expected).norm() / expected.norm()).item()
    results["small_shape_rel_err"] = err
    print(f"correctness small grid (6,10,13) bf16 vs fp32 reference: rel err {err:.2e}")
    assert err < 2e-2, err


def check_sla_correctness(results: dict) -> None:
    """Small grid with partial blocks: the full SLA call (bf16, with a proj_l) vs the fp32 torch reference."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    metadata = attention.build_sla_metadata((6, 10, 13), "cuda", sla_topk=0.3)
    q, k, v = (torch.randn(1, 4, metadata.seq_len, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
               for _ in range(3))
    weight = torch.randn(HEAD_DIM, HEAD_DIM, device="cuda", generator=gen) / math.sqrt(HEAD_DIM)
    bias = torch.randn(HEAD_DIM, device="cuda", generator=gen)
    expected = attention.sla_attention_reference(q.float(), k.float(), v.float(), metadata, proj_l_weight=weight,
                                                 proj_l_bias=bias)
    got = attention.SLAAttention(metadata, impl="triton").for_layer(weight, bias)(q, k, v)
    err = ((got.float() - expected).norm() / expected.norm()).item()
    results["sla_small_shape_rel_err"] = err
    print(f"SLA correctness small grid (6,10,13) bf16 vs fp32 reference: rel err {err:.2e}")
    assert err < 2e-2, err


def sla_reference_rows(q, k, v, metadata, block_index, weight, bias, query_blocks) -> torch.Tensor:
    """fp32 SLA output of a few query blocks on a given selection: softmax over the selected blocks' real keys plus
    proj_l of the linear branch over all tokens (attention.sla's spec, restricted to those rows)."""
    from tessera.attention.sla import sla_linear_reference

    S, bq, bk = metadata.seq_len, metadata.block_q, metadata.block_k
    outs = []
    for qb in query_blocks:
        rows = slice(qb * bq, min(S, qb * bq + bq))
        keys = (block_index[:, :, qb].long()[..., None] * bk + torch.arange(bk, device=q.device)).flatten(-2)
        real = keys < S
        keys = keys.clamp(max=S - 1)[..., None].expand(-1, -1, -1, q.shape[-1])
        scores = q[:, :, rows].float() @ k.float().gather(2, keys).transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~real[:, :, None, :], float("-inf")).softmax(-1)
        linear = sla_linear_reference(q[:, :, rows], k, v, metadata.feature_map)
        outs.append(probs @ v.float().gather(2, keys) + F.linear(linear, weight.float(), bias.float()))
    return torch.cat(outs, dim=2)


def bench_sla(name: str, grid, q, k, v, topk: float, add, results: dict, variants: bool) -> None:
    """SLA at the checkpoints' 128 x 64 blocks: the full call with a proj_l (every SLA layer has one), its stages,
    and a few query blocks (the partial last one too) against the fp32 reference on the kernel's own selection."""
    metadata = attention.build_sla_metadata(grid, "cuda", sla_topk=topk)
    S, bq, bk, J = metadata.seq_len, metadata.block_q, metadata.block_k, metadata.num_selected
    gen = torch.Generator(device="cuda").manual_seed(1)
    weight = (torch.randn(HEAD_DIM, HEAD_DIM, device="cuda", generator=gen) / math.sqrt(HEAD_DIM)).to(q.dtype)
    bias = torch.randn(HEAD_DIM, device="cuda", generator=gen).to(q.dtype)
    sla = attention.SLAAttention(metadata, dtype=q.dtype, head_dim=HEAD_DIM).for_layer(weight, bias)
    extra = {"topk": topk, "num_selected": J}
    full = lambda: sla(q, k, v)  # noqa: E731
    add(f"sla full t={topk}", time_ms(full), {**extra, "host_us": host_us(full), "kernel": sla.kernel})
    add(f"sla full graph t={topk}", graph_ms(full) or float("nan"), extra)
    add(f"sla full queued t={topk}", queued_ms(full), extra)

    def select():
        return sla_triton.sla_topk_blocks(sla_triton.sla_pooled_scores(q, k, bq, bk), J)

    block_index = select()
    add(f"sla select t={topk}", time_ms(select), extra)
    add("sla linear state", time_ms(lambda: sla_triton.sla_linear_state(k, v)))
    sizes_q = torch.full((metadata.num_q_blocks,), bq, device="cuda")
    sizes_q[-1] = S - (metadata.num_q_blocks - 1) * bq
    sizes_k = torch.full((metadata.num_k_blocks,), bk, device="cuda")
    sizes_k[-1] = S - (metadata.num_k_blocks - 1) * bk
    pairs = (sizes_k[block_index.long()].sum(-1) * sizes_q).sum().item()  # real (query, key) pairs
    for label, proj in (("sparse only", (None, None)), ("sparse+linear", (weight, bias))):
        def sparse(proj=proj):
            return sla_triton.sla_sparse_attention(q, k, v, block_index, bq, bk, proj_l_weight=proj[0],
                                                   proj_l_bias=proj[1])
        ms = time_ms(sparse)
        add(f"sla {label} t={topk}", ms, {**extra, "real_tflops": 4.0 * pairs * HEAD_DIM / ms / 1e9})
    if variants:  # the measurements behind sla_triton._SPARSE_CONFIGS (16-bit)
        reference = sla_triton.sla_sparse_attention(q, k, v, block_index, bq, bk, proj_l_weight=weight,
                                                    proj_l_bias=bias).float()
        for block_m, warps, stages in ((128, 8, 2), (128, 8, 3), (128, 8, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4),
                                       (128, 4, 3), (64, 8, 3)):
            config = dict(BLOCK_M=block_m, num_warps=warps, num_stages=stages)
            def call(config=config):
                return sla_triton.sla_sparse_attention(q, k, v, block_index, bq, bk, proj_l_weight=weight,
                                                       proj_l_bias=bias, config=config)
            err = ((call().float() - reference).norm() / reference.norm()).item()
            ms = time_ms(call)
            add(f"sla m{block_m} w{warps} s{stages} t={topk}", ms,
                {**extra, "real_tflops": 4.0 * pairs * HEAD_DIM / ms / 1e9, "diff_vs_default": err})
    blocks = [0, metadata.num_q_blocks // 2, metadata.num_q_blocks - 1]  # the last one is partial at both shapes
    expected = sla_reference_rows(q, k, v, metadata, block_index, weight, bias, blocks)
    out = full()
    got = torch.cat([out[:, :, b * bq : (b + 1) * bq] for b in blocks], dim=2).float()
    err = ((got - expected).norm() / expected.norm()).item()
    print(f"{name} sla t={topk} (J={J}/{metadata.num_k_blocks}): query blocks {blocks} vs fp32 reference: "
          f"rel err {err:.2e}")
    results.setdefault("sla_real_shape_rel_err", {})[f"{name} t={topk}"] = err


def bench_shape(name: str, sparsities: list[float], args, results: dict) -> None:
    grid, N = SHAPES[name]
    meta0 = attention.build_vsa_metadata(grid, sparsities[0], "cuda")
    S, T = meta0.total_seq_length, meta0.num_tiles
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, gate = (torch.randn(1, N, S, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
                     for _ in range(4))
    if args.inputs == "dit":  # a DiT forward's layer-15 inputs, laid out as the random ones ([B, N, S, D])
        from dit_capture import GRID, HEADS, capture_attention_inputs

        if (grid, N) != (GRID, HEADS):
            raise SystemExit(f"--inputs dit captures the Wan-1.3B 480p forward only; use --shapes wan1.3b-480p "
                             f"(got {name})")
        q, k, v, gate = (x.transpose(1, 2).contiguous() for x in capture_attention_inputs((15,))[15])
    dense_flops = 4.0 * S * S * N * HEAD_DIM
    rows = []

    def add(label: str, ms: float, extra: dict | None = None) -> None:
        rows.append({"shape": name, "what": label, "ms": ms, "dense_equiv_tflops": dense_flops / ms / 1e9,
                     **(extra or {})})

    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "dense sdpa cudnn"),
                           (SDPBackend.FLASH_ATTENTION, "dense sdpa flash")):
        with sdpa_kernel([backend]):
            add(label, time_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
            if backend == SDPBackend.CUDNN_ATTENTION:
                add(label + " graph", graph_ms(lambda: F.scaled_dot_product_attention(q, k, v)) or float("nan"))
                add(label + " queued", queued_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
    for sparsity in [] if args.sla_only else sparsities:
        metadata = attention.build_vsa_metadata(grid, sparsity, "cuda")
        vsa = attention.VSAAttention(metadata, impl="triton", fine_kernel=args.fine_kernel)
        block_index, coarse = attention.vsa_select_blocks(q, k, v, metadata)
        def fine(metadata=metadata, block_index=block_index, coarse=coarse):
            return vsa_triton.vsa_fine_attention(q, k, v, metadata.tile_offsets, block_index, coarse, gate)

        out = fine()
        sizes = metadata.variable_block_sizes.long()
        pairs = (sizes[block_index.long()].sum(-1) * sizes).sum().item()  # real (query, key) pairs
        real_flops = 4.0 * pairs * HEAD_DIM
        ms_fine = time_ms(fine)
        add(f"vsa fine triton tile ids s={sparsity}", ms_fine,
            {"topk": metadata.topk, "real_tflops": real_flops / ms_fine / 1e9})
        def select(metadata=metadata):
            means = vsa_coarse_triton.vsa_tile_means((q, k, v), metadata.tile_offsets, metadata.num_tiles)
            return vsa_coarse_triton.vsa_select_from_means(*means, metadata.topk)

        def select_torch(metadata=metadata):  # the spec's selection on the Triton means (the old path)
            means = vsa_coarse_triton.vsa_tile_means((q, k, v), metadata.tile_offsets, metadata.num_tiles)
            return attention.select_from_tile_means(*means, metadata.topk)

        add(f"vsa select s={sparsity}", time_ms(select))
        add(f"vsa select torch s={sparsity}", time_ms(select_torch))
        (tri_index, tri_coarse, _), (spec_index, spec_coarse) = select(), select_torch()
        same_rows = (tri_index == spec_index).all(-1).float().mean().item()
        coarse_err = ((tri_coarse - spec_coarse).norm() / spec_coarse.norm()).item()
        print(f"{name} s={sparsity}: Triton selection equals the spec's on {same_rows:.6f} of rows "
              f"(scores differ only in summation order); coarse rel err {coarse_err:.2e}")
        results.setdefault("select_vs_spec", {})[f"{name} s={sparsity}"] = {
            "same_rows": same_rows, "coarse_rel_err": coarse_err}
        if args.coarse and sparsity == 0.9 and not args.variants:
            time_coarse_variants(q, k, v, metadata, add)
        if args.variants and sparsity == 0.9:
            time_variants(name, q, k, v, gate, metadata, block_index, coarse, out, add)
        full = lambda: vsa(q, k, v, gate)  # noqa: B023, E731
        add(f"vsa full s={sparsity}", time_ms(full), {"topk": metadata.topk, "host_us": host_us(full),
                                                     "fine_kernel": vsa.kernel})
        add(f"vsa full graph s={sparsity}", graph_ms(full) or float("nan"), {"topk": metadata.topk})
        add(f"vsa full queued s={sparsity}", queued_ms(full), {"topk": metadata.topk})
        tiles = [0, T // 2, T - 1]  # the last tile is partial on every axis at these grids
        expected = masked_dense_rows(q, k, v, gate, coarse, metadata, block_index, tiles)
        offs = metadata.tile_offsets.tolist()
        got = torch.cat([out[:, :, offs[t]:offs[t + 1]] for t in tiles], dim=2).float()
        err = ((got - expected).norm() / expected.norm()).item()
        print(f"{name} s={sparsity}: fine kernel vs masked dense on tiles {tiles}: rel err {err:.2e}")
        results.setdefault("real_shape_rel_err", {})[f"{name} s={sparsity}"] = err
        if args.peer:
            run_peer(name, sparsity, metadata, q, k, v, gate, add)
    for topk in args.sla_topk:
        bench_sla(name, grid, q, k, v, topk, add, results, args.variants and topk == args.sla_topk[0])
    def mode(label: str) -> str:  # compare like with like: eager, graph or queued cuDNN
        return next((m for m in ("graph", "queued") if f" {m}" in label), "eager")

    cudnn_ms = {mode(row["what"]): row["ms"] for row in rows if row["what"].startswith("dense sdpa cudnn")}
    for row in rows:
        row["speedup_vs_cudnn"] = cudnn_ms[mode(row["what"])] / row["ms"]
    results.setdefault("rows", []).extend(rows)
    best = getattr(vsa_triton._vsa_fine_kernel_tuned, "best_config", None)  # pointer path only
    mode = vsa_triton._default_load_mode(q, k, v)  # 2: TMA with a fixed config, no autotuning
    results.setdefault("autotune_best", {})[name] = f"load_mode={mode} " + (str(best) if mode == 0 else "")


def time_variants(name, q, k, v, gate, metadata, block_index, coarse, reference, add) -> None:
    """Fine-kernel pipeline depths, coarse-stage configs (each checked against the default's output), top-k
    warps per row, and the tile-means launch alone: the measurements behind the defaults in vsa_triton.py and
    vsa_coarse_triton.py."""
    means = vsa_coarse_triton.vsa_tile_means((q, k, v), metadata.tile_offsets, metadata.num_tiles)
    ref_index, ref_coarse, spans = vsa_coarse_triton.vsa_select_from_means(*means, metadata.topk, metadata.tile_offsets)
    for use_spans in (False, True):
        for stages in (2, 3, 4):
            def call(stages=stages, use_spans=use_spans):
                return vsa_triton._launch(q, k, v, metadata.tile_offsets, spans if use_spans else ref_index, coarse,
                                          gate, config=dict(num_warps=4, num_stages=stages), spans=use_spans)
            err = ((call().float() - reference.float()).norm() / reference.float().norm()).item()
            add(f"fine stages={stages} spans={int(use_spans)}", time_ms(call), {"diff_vs_default": err})
    from tessera.attention.vsa_gluon import BLOCK, ROW_BOX, gluon_fine_supported

    if gluon_fine_supported(q):
        def packed_blocks(spans):  # the Gluon kernel's count: ROW_BOX-row boxes, BLOCK // ROW_BOX to a block
            boxes = ((spans & 127) + ROW_BOX - 1).div(ROW_BOX, rounding_mode="floor").sum(-1)
            return (boxes + BLOCK // ROW_BOX - 1).div(BLOCK // ROW_BOX, rounding_mode="floor")

        # the same kernel on a uniform draw of topk tiles per row: real videos need not favour partial tiles
        # the way random inputs do (their means over fewer tokens score higher), so packing gains less there
        offsets = metadata.tile_offsets.long()
        uniform = torch.rand(spans.shape[:-1] + (metadata.num_tiles,), device=q.device).topk(metadata.topk).indices
        starts, lengths = offsets[uniform], offsets[uniform + 1] - offsets[uniform]
        whole_first = (lengths != BLOCK).int().sort(dim=-1, stable=True).indices  # the select kernel's order
        uniform_spans = ((starts << 7) | lengths).gather(-1, whole_first)
        for label, row_spans in (("", spans), (" uniform", uniform_spans.int())):
            blocks = packed_blocks(row_spans).float().mean().item()
            print(f"{name}{label}: topk {metadata.topk}, packed key blocks per query tile {blocks:.2f}")
            for stages, row_box in (((3, 16), (3, 32), (3, 64), (2, 16)) if not label else ((3, 16), (3, 64))):
                config = dict(stages=stages, row_box=row_box)
                def call(config=config, row_spans=row_spans):
                    return vsa_triton._launch(q, k, v, metadata.tile_offsets, row_spans, coarse, gate, load_mode=3,
                                              config=config, spans=True)
                err = ((call().float() - reference.float()).norm() / reference.float().norm()).item()
                add(f"gluon fine{label} stages={stages} row_box={row_box}", time_ms(call),
                    {"diff_vs_default": err if not label else None, "topk": metadata.topk, "packed_blocks": blocks})
            # the two bounds of the fine kernel's time on the same spans: the key stream alone (TMA copies into
            # the ring, released at once) and the arithmetic alone (no copies); bytes: the boxes the copies move
            boxes = ((row_spans & 127) + ROW_BOX - 1).div(ROW_BOX, rounding_mode="floor").sum().item()
            key_bytes = boxes * ROW_BOX * q.shape[-1] * q.element_size() * 2
            for probe, stages in (("", 3), ("loads", 3), ("loads", 2), ("loads", 6), ("math", 3)):
                config = dict(stages=stages, row_box=ROW_BOX, probe=probe)
                def call(config=config, row_spans=row_spans):
                    return vsa_triton._launch(q, k, v, metadata.tile_offsets, row_spans, coarse, gate, load_mode=3,
                                              config=config, spans=True)
                graphed = graph_ms(call)
                ms = graphed or time_ms(call)
                add(f"gluon probe{label} {probe or 'full'} stages={stages} ({'graph' if graphed else 'eager'})", ms,
                    {"key_bytes": key_bytes, "key_tb_per_s": key_bytes / ms / 1e9})
    time_coarse_variants(q, k, v, metadata, add)


def time_coarse_variants(q, k, v, metadata, add) -> None:
    """The coarse stage's launches and their configs, as CUDA-graph replays (these launches take tens of
    microseconds, where an eager timing measures the host): tile means by heads per program and warps, on the
    inputs' layout and on a token-major one (the DiT's); the coarse kernel (+ top-k) by block shape; top-k by rows
    per program and radix bits, each checked equal to the default's selection; the whole stage as a call runs it."""
    def graphed(fn) -> float:
        return graph_ms(fn) or float("nan")

    means = vsa_coarse_triton.vsa_tile_means((q, k, v), metadata.tile_offsets, metadata.num_tiles)
    ref_index, ref_coarse, spans = vsa_coarse_triton.vsa_select_from_means(*means, metadata.topk, metadata.tile_offsets)
    token_major = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]  # [B, N, S, D] views of BSND
    for layout, xs in (("bnsd", (q, k, v)), ("token-major", token_major)):
        for heads, warps in ((1, 2), (1, 4), (2, 2), (2, 4), (4, 4), (4, 8)):
            def means_call(xs=xs, heads=heads, warps=warps):
                return vsa_coarse_triton.vsa_tile_means(xs, metadata.tile_offsets, metadata.num_tiles, warps, heads)
            # fp32 sums in another order (warps, head groups) can round to a neighbouring bf16 value
            torch.testing.assert_close(means_call().float(), means.float(), rtol=2.0**-7, atol=1e-6)
            add(f"tile means {layout} h{heads} w{warps} (graph)", graphed(means_call))
    for block_q, block_k, precision, warps, splits in (
            (16, 32, "tf32x3", 4, 1), (32, 32, "tf32x3", 4, 1), (32, 32, "tf32", 4, 1), (16, 64, "tf32x3", 4, 1),
            (32, 64, "tf32x3", 8, 1), (32, 32, "tf32x3", 4, 2), (32, 32, "tf32x3", 4, 4), (32, 32, "tf32x3", 4, 8),
            (16, 32, "tf32x3", 4, 4), (16, 32, "tf32x3", 4, 8), (32, 64, "tf32x3", 4, 4), (64, 32, "tf32x3", 4, 8)):
        config = dict(BLOCK_Q=block_q, BLOCK_K=block_k, COARSE_PRECISION=precision, num_warps=warps, SPLITS=splits)
        def select(config=config):
            return vsa_coarse_triton.vsa_select_from_means(*means, metadata.topk, metadata.tile_offsets, config=config)
        got_index, got_coarse, _ = select()
        err = ((got_coarse - ref_coarse).norm() / ref_coarse.norm()).item()
        same = (got_index == ref_index).all(-1).float().mean().item()
        add(f"coarse+topk q{block_q} k{block_k} {precision} w{warps} splits={splits} (graph)", graphed(select),
            {"coarse_diff": err, "same_rows": same})
    scores = torch.randn(q.shape[0] * q.shape[1], metadata.num_tiles, metadata.num_tiles, device=q.device)
    ref_topk = vsa_coarse_triton.vsa_topk_lower_index_wins(scores, metadata.topk)
    for rows, radix_bits, warps, early in ((1, 1, 2, False), (1, 1, 1, True), (1, 1, 2, True), (1, 1, 4, True),
                                           (2, 1, 2, True), (2, 1, 4, True), (4, 1, 4, True), (4, 1, 8, True),
                                           (8, 1, 8, True), (1, 2, 2, True), (2, 2, 4, True), (4, 2, 8, True),
                                           (4, 1, 4, False)):
        config = dict(ROWS=rows, RADIX_BITS=radix_bits, EARLY_EXIT=early)
        def topk(config=config, warps=warps):
            return vsa_coarse_triton._topk(scores, metadata.topk, warps, metadata.tile_offsets, config)
        assert torch.equal(topk()[0], ref_topk)
        add(f"topk+spans rows={rows} bits={radix_bits} w{warps} early={int(early)} (graph)", graphed(topk))
    def stage():
        qkv_means = vsa_coarse_triton.vsa_tile_means(token_major, metadata.tile_offsets, metadata.num_tiles)
        return vsa_coarse_triton.vsa_select_from_means(*qkv_means, metadata.topk, metadata.tile_offsets)
    add("coarse stage as called, token-major (graph)", graphed(stage))


def run_peer(name, sparsity, metadata, q, k, v, gate, add) -> None:
    """FastVideo's Hopper kernel on the same inputs, padded layout (see shared/PEER_KERNEL.md)."""
    try:
        sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
        ctypes.CDLL("libcuda.so.1", mode=os.RTLD_GLOBAL)
        import fastvideo_kernel  # noqa: F401

        module = sys.modules["fastvideo_kernel.block_sparse_attn"]
        from fastvideo_kernel import video_sparse_attn
    except Exception as exc:
        print(f"peer unavailable: {exc}")
        return
    if module._get_sm90_ops()[0] is None:
        print("peer: Hopper op not loaded (would fall back to Triton); skipped")
        return
    # q, k, v are in compact tile order; tile() takes raster order, so map back first.
    to_raster = metadata.reverse_tile_partition_indices.to(q.device)  # a host table (VSAMetadata)
    padded = [attention.tile(x.index_select(2, to_raster), metadata).clone() for x in (q, k, v, gate)]
    sizes = metadata.variable_block_sizes

    def call():
        return video_sparse_attn(padded[0], padded[1], padded[2], sizes, sizes, metadata.topk,
                                 block_size=(4, 4, 4), compress_attn_weight=padded[3])

    add(f"peer fastvideo full s={sparsity}", time_ms(call), {"topk": metadata.topk, "host_us": host_us(call)})
    add(f"peer fastvideo full graph s={sparsity}", graph_ms(call) or float("nan"), {"topk": metadata.topk})
    add(f"peer fastvideo full queued s={sparsity}", queued_ms(call), {"topk": metadata.topk})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    parser.add_argument("--peer", action="store_true", help="also time fastvideo_kernel if importable")
    parser.add_argument("--inputs", choices=("random", "dit"), default="random",
                        help="dit: q, k, v, gate of a 1.3B DiT forward's layer 15 (bench/dit_capture.py; its "
                             "selection moves more real keys than random inputs'), with --shapes wan1.3b-480p")
    parser.add_argument("--variants", action="store_true",
                        help="time kernel variants at s=0.9 (VSA) and at the first --sla-topk (SLA)")
    parser.add_argument("--coarse", action="store_true",
                        help="time the coarse stage's variants at s=0.9 (a part of --variants)")
    parser.add_argument("--fine-kernel", choices=("auto", "gluon", "triton"), default="auto",
                        help="the full VSA call's fine kernel (VSAAttention(fine_kernel=...)); triton forces Triton")
    parser.add_argument("--sla-topk", nargs="*", type=float, default=[0.1, 0.15],
                        help="SLA top-k fractions to time (none: no SLA rows)")
    parser.add_argument("--sla-only", action="store_true", help="time dense SDPA and SLA only (no VSA rows)")
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "inputs": args.inputs}
    if not args.sla_only:
        check_correctness(results)
    if args.sla_topk:
        check_sla_correctness(results)
    for name in args.shapes:
        bench_shape(name, args.sparsity, args, results)
    print(f"\n{'shape':<14} {'what':<28} {'ms':>9} {'TFLOP/s*':>9} {'x cuDNN':>8}")
    for row in results["rows"]:
        print(f"{row['shape']:<14} {row['what']:<28} {row['ms']:>9.3f} {row['dense_equiv_tflops']:>9.1f} "
              f"{row['speedup_vs_cudnn']:>8.2f}")
    print("* dense-equivalent: 4*S*S*N*D / t; x cuDNN against cuDNN timed the same way (eager, graph or queued)")
    print(f"autotune best: {results.get('autotune_best')}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
