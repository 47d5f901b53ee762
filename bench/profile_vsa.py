"""Kernel-level profile of the VSA path at the Wan-1.3B 480p shape: where the milliseconds go.

    python bench/profile_vsa.py [--forward [--fp8]] [--host] [--dit-inputs]

Prints torch.profiler's CUDA-time table for one VSA attention call (coarse stage + fine kernel) and, with
--forward, for one whole DiT forward (random bf16 weights, sparsity 0.9; the runtime's eager token-local stages,
their Triton ops); --fp8 then again with the block linears in FP8 (models/fp8.py, `model.quant=fp8`'s stages).
With --host, cProfile's table for the host side of 200 eager VSA calls (the launch work, which an eager call
exposes when it outlasts the kernels queued before the fine kernel).
With --dit-inputs, the fine kernel on q, k, v, gate captured from a DiT forward (layers 0, 15, 29) against random
ones, crossed with each one's selection: whether the forward's slower fine kernel comes from its inputs' values,
their selection, or neither (then clocks after the forward's GEMMs, timed last).
"""

from __future__ import annotations

import argparse

import torch
from _timing import graph_replay_ms  # noqa: E402
from dit_capture import capture_attention_inputs  # noqa: E402
from tessera import attention  # noqa: E402
from torch.profiler import ProfilerActivity, profile

GRID, HEADS, HEAD_DIM = (21, 30, 52), 12, 128


def table(fn, title: str, rows: int = 18) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n=== {title}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--forward", action="store_true")
    parser.add_argument("--host", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="with --forward: also profile the FP8 forward")
    parser.add_argument("--dit-inputs", action="store_true")
    args = parser.parse_args()
    metadata = attention.build_vsa_metadata(GRID, 0.9, "cuda")
    S = metadata.total_seq_length
    gen = torch.Generator(device="cuda").manual_seed(0)
    # [B, S, N, D] viewed as BNSD: the layout Ulysses hands the backend at sp=1
    q, k, v, gate = (torch.randn(1, S, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
                     .transpose(1, 2) for _ in range(4))
    vsa = attention.VSAAttention(metadata, impl="triton")
    table(lambda: vsa(q, k, v, gate), "one VSA call, 1.3B 480p, sparsity 0.9")
    if args.host:
        import cProfile
        import pstats

        torch.cuda.synchronize()
        torch.cuda._sleep(int(4e9))  # the GPU spins: the calls below only queue
        with cProfile.Profile() as host:
            for _ in range(200):
                vsa(q, k, v, gate)
        torch.cuda.synchronize()
        print("\n=== host side of 200 eager VSA calls")
        pstats.Stats(host).sort_stats("tottime").print_stats(25)
    if args.dit_inputs:
        dit_inputs(metadata, (q, k, v, gate))
    if args.forward:
        from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_
        from tessera.parallel import build_mesh
        from tessera.runtime import AttentionConfig, build_attention_plan
        from tessera.runtime.request import build_request_state

        cfg = WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                        gate_compress=True)
        model = materialize_random_(build_wan_on_meta(cfg), seed=0, device="cuda", dtype=torch.bfloat16).eval()
        model.use_fast_stages(compile=False)
        device = torch.device("cuda")
        plan = build_attention_plan(AttentionConfig(backend="vsa", sparsity=0.9), num_layers=30, num_steps=1,
                                    grid_thw=GRID, head_dim=128, dtype=torch.bfloat16, device=device)
        state = build_request_state(model, plan, GRID, build_mesh(cfg=1, sp=1, device=device),
                                    attention.MetadataCache())
        latents = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
        text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
        t = torch.tensor([500.0], device="cuda")
        ctx = state.context_for_step(0)
        table(lambda: model(latents, t, text, ctx=ctx), "one DiT forward, VSA 0.9", rows=45)
        if args.fp8:
            from tessera.models.fp8 import quantize_blocks_fp8_
            quantize_blocks_fp8_(model)  # the model already runs the eager fast stages, as the runtime's FP8 does
            table(lambda: model(latents, t, text, ctx=ctx), "one DiT forward, VSA 0.9, model.quant=fp8", rows=30)


def dit_inputs(metadata, random_qkvg) -> None:
    """The fine kernel on a DiT forward's own q, k, v, gate against random ones (see the module docstring)."""
    from tessera.attention import vsa_coarse_triton, vsa_triton

    layers = (0, 15, 29)
    captured = capture_attention_inputs(layers)
    m = metadata

    def selection(qkvg):
        means = vsa_coarse_triton.vsa_tile_means(qkvg[:3], m.tile_offsets, m.num_tiles)
        return vsa_coarse_triton.vsa_select_from_means(*means, m.topk, m.tile_offsets)

    def fine(qkvg, sel):
        block_index, coarse, spans = sel
        out = torch.empty_like(qkvg[0])
        return lambda: vsa_triton.vsa_fine_attention(*qkvg[:3], m.tile_offsets, block_index, coarse, qkvg[3],
                                                     out_BNSD=out, key_spans=spans, gluon=True)

    partial = (m.tile_offsets[1:] - m.tile_offsets[:-1] != 64)
    print(f"\n=== fine kernel on DiT inputs (ms, CUDA-graph replays); {int(partial.sum())} of {m.num_tiles} tiles "
          "partial")
    random_sel = selection(random_qkvg)

    def stats(sel):
        block_index = sel[0].long()  # [B, N, T, K]
        share_partial = partial[block_index].float().mean().item()
        nxt = block_index[:, :, 1:, :, None] == block_index[:, :, :-1, None, :]
        overlap = nxt.any(-1).float().mean().item()  # of query tile t+1's picks, the share tile t also picked
        hubs = torch.bincount(block_index.flatten(), minlength=m.num_tiles).float()
        return (f"partial share {share_partial:.3f}, next-tile overlap {overlap:.3f}, "
                f"most-picked tile {hubs.max().item() / block_index[..., 0].numel():.2f} of rows")

    print(f"random inputs: {graph_replay_ms(fine(random_qkvg, random_sel)):.3f} ms; {stats(random_sel)}")
    for layer in layers:
        # BSND -> the BNSD views the backend gets
        dit = tuple(x.transpose(1, 2) for x in captured[layer])
        dit_sel = selection(dit)
        print(f"layer {layer:2d}: dit values + dit selection {graph_replay_ms(fine(dit, dit_sel)):.3f}, "
              f"random values + dit selection {graph_replay_ms(fine(random_qkvg, dit_sel)):.3f}, "
              f"dit values + random selection {graph_replay_ms(fine(dit, random_sel)):.3f}; {stats(dit_sel)}")
    a = torch.randn(32760, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8960, 1536, device="cuda", dtype=torch.bfloat16)
    call = fine(random_qkvg, random_sel)
    for _ in range(200):  # the forward's GEMM load (seconds), then the random-input kernel at once
        a @ w.t()
    print(f"random inputs right after 200 FFN-size GEMMs: {graph_replay_ms(call):.3f} ms")


if __name__ == "__main__":
    main()
