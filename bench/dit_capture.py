"""A Wan-1.3B DiT forward's own self-attention inputs, for the attention benchmarks: real selections instead of
random q/k, whose partial tiles (their means vary more) win half the top-k picks where a DiT's take about 30%.

    from dit_capture import capture_attention_inputs   (bench/ is on sys.path when a bench script runs)
"""

from __future__ import annotations

import dataclasses

import torch

GRID, HEADS = (21, 30, 52), 12  # 480x832x81 after the VAE and the (1, 2, 2) patch


@torch.inference_mode()
def capture_attention_inputs(layers: tuple[int, ...] = (15,), seed: int = 0) -> dict[int, tuple[torch.Tensor, ...]]:
    """{layer: (q, k, v, gate)}, each [1, S, 12, 128] bf16 in tile order (what the VSA backend receives, before its
    [B, N, S, D] view), from one forward of a random-weight 1.3B DiT (VSA 0.9, timestep 500) on random latents and
    text; the model is freed before returning."""
    from tessera import attention
    from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_
    from tessera.parallel import build_mesh
    from tessera.runtime import AttentionConfig, build_attention_plan
    from tessera.runtime.request import build_request_state

    device = torch.device("cuda")
    cfg = WanConfig(num_attention_heads=HEADS, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                    gate_compress=True)
    model = materialize_random_(build_wan_on_meta(cfg), seed=seed, device=device, dtype=torch.bfloat16).eval()
    model.use_fast_stages(compile=False)
    plan = build_attention_plan(AttentionConfig(backend="vsa", sparsity=0.9), num_layers=30, num_steps=1,
                                grid_thw=GRID, head_dim=128, dtype=torch.bfloat16, device=device)
    ctx = build_request_state(model, plan, GRID, build_mesh(cfg=1, sp=1, device=device),
                              attention.MetadataCache()).context_for_step(0)
    captured: dict[int, tuple[torch.Tensor, ...]] = {}

    class Capture:
        def __init__(self, inner, index):
            self.inner, self.index, self.uses_gate = inner, index, inner.uses_gate

        def __call__(self, q, k, v, gate):
            if self.index in layers:
                captured[self.index] = tuple(x.clone() for x in (q, k, v, gate))
            return self.inner(q, k, v, gate)

    gen = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(1, 16, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=gen).to(device, torch.bfloat16)
    text = torch.randn(1, 512, 4096, generator=gen).to(device, torch.bfloat16)
    probe = dataclasses.replace(ctx, attn=tuple(Capture(a, i) for i, a in enumerate(ctx.attn)))
    model(latents, torch.tensor([500.0], device=device), text, ctx=probe)
    torch.cuda.synchronize()
    del model, ctx, probe
    torch.cuda.empty_cache()
    return captured
