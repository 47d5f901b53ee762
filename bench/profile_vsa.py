"""Kernel-level profile of the VSA path at the Wan-1.3B 480p shape: where the milliseconds go.

    python bench/profile_vsa.py [--forward [--fp8]] [--host]

Prints torch.profiler's CUDA-time table for one VSA attention call (coarse stage + fine kernel) and, with
--forward, for one whole DiT forward (random bf16 weights, sparsity 0.9; the runtime's eager token-local stages,
their Triton ops); --fp8 then again with the block linears in FP8 (models/fp8.py, `model.quant=fp8`'s stages).
With --host, cProfile's table for the host side of 200 eager VSA calls (the launch work, which an eager call
exposes when it outlasts the kernels queued before the fine kernel).
"""

from __future__ import annotations

import argparse

import torch
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
        table(lambda: model(latents, t, text, ctx=ctx), "one DiT forward, VSA 0.9", rows=30)
        if args.fp8:
            from tessera.models.fp8 import quantize_blocks_fp8_
            quantize_blocks_fp8_(model)  # the model already runs the eager fast stages, as the runtime's FP8 does
            table(lambda: model(latents, t, text, ctx=ctx), "one DiT forward, VSA 0.9, model.quant=fp8", rows=30)


if __name__ == "__main__":
    main()
