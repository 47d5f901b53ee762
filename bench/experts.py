"""Wan2.2 A14B's two experts on one GPU: both resident, or the idle one offloaded to host memory.

    python bench/experts.py --out experts.json [--backend vsa|dense] [--sparsity 0.9] [--no-cfg] [--steps 2]
    python bench/experts.py --tiny    # a toy config on the GPU if there is one, else the CPU: the script end to end

Two random bf16 experts of the 14B architecture (seeds 0 and 1; no VSA gate, as the A14B checkpoints), latents
16x21x90x160 (720x1280x81), 512 text tokens, CFG as one batch-2 forward with guidance 4.0 / 3.0 (the A14B defaults).
The blocks warm up on both experts, then a short flow-matching Euler run (the first half of the
steps on the high-noise expert, the rest on the low-noise one) runs twice through the product's `Experts`
(runtime/experts.py):
  resident: both experts on the device; the run's peak memory and seconds per step.
  offloaded: the same models added to `Experts(offload=True)`, which moves each to pinned host memory; at every
    switch `activate_synced` copies one expert to the device (its seconds are the run's `moves`), then `--switches`
    more alternating switches time the copy alone. The run's peak memory and seconds per step.
Step seconds exclude the switches, as the product's report does. Attention contexts are built as in dit_forward.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from dit_forward import forward_context
from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_
from tessera.runtime.experts import Experts

# Latents [C, F, H, W] and text tokens of each size; the config's other fields are WanConfig's defaults.
A14B = dict(config=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
            latents=(16, 21, 90, 160), text_tokens=512)
TINY = dict(config=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=64),
            latents=(16, 5, 16, 16), text_tokens=8)
GUIDANCE = (4.0, 3.0)  # the high-noise, the low-noise expert's


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device: torch.device) -> dict:
    """The device's peak allocated and reserved GiB since the last reset (empty off CUDA)."""
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def expert_of(step: int, steps: int) -> int:
    return 2 * step // steps


def euler_step(model, ctx, x, text, sigma: float, sigma_next: float, guidance: float) -> torch.Tensor:
    """One flow-matching Euler step of the fp32 latents `x` [1, C, F, H, W]; CFG when `text` holds two prompts."""
    batch = text.shape[0]
    timestep = torch.full((batch,), sigma * 1000.0, device=x.device)
    pred = model(x.to(torch.bfloat16).expand(batch, -1, -1, -1, -1), timestep, text, ctx=ctx).float()
    if batch == 2:
        cond, uncond = pred.chunk(2)
        pred = uncond + guidance * (cond - uncond)
    return x + (sigma_next - sigma) * pred


def denoise(experts: Experts, ctxs, noise, text, steps: int) -> tuple[dict, torch.Tensor]:
    """The Euler run through `experts`: at each switch `activate_synced`, then the step, timed on its own. Returns
    the report and the final latents."""
    device = noise.device
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x, step_seconds, moves = noise, [], []
    for step in range(steps):
        expert = expert_of(step, steps)
        if step == 0 or expert != expert_of(step - 1, steps):
            moves.append({"step": step, "expert": expert, "seconds": experts.activate_synced(expert)})
        t0 = time.perf_counter()
        x = euler_step(experts.models[expert], ctxs[expert], x, text, sigmas[step], sigmas[step + 1],
                       GUIDANCE[expert])
        _sync(device)
        step_seconds.append(time.perf_counter() - t0)
    report = {"expert_per_step": [expert_of(s, steps) for s in range(steps)], "step_seconds": step_seconds,
              "moves": moves, **_memory(device)}
    return report, x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("vsa", "dense"), default="vsa")
    parser.add_argument("--sparsity", type=float, default=0.9, help="VSA's")
    parser.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                        help="classifier-free guidance: batch-2 forwards")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps, half on each expert (>= 2)")
    parser.add_argument("--switches", type=int, default=4, help="offloaded: extra alternating switches, timed")
    parser.add_argument("--tiny", action="store_true", help="a toy config; runs on the CPU when there is no GPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2: half the steps run on each expert")
    if not (args.tiny or torch.cuda.is_available()):
        parser.error("the A14B run needs a CUDA GPU (--tiny runs on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = TINY if args.tiny else A14B
    cfg = WanConfig(**size["config"])

    models, build_seconds = [], []
    for seed in (0, 1):
        t0 = time.perf_counter()
        model = materialize_random_(build_wan_on_meta(cfg), seed=seed, device=device, dtype=torch.bfloat16).eval()
        if device.type == "cuda":
            model.use_fast_stages(compile=False)
        models.append(model)
        _sync(device)
        build_seconds.append(time.perf_counter() - t0)
    gen = torch.Generator("cpu").manual_seed(0)
    noise = torch.randn(1, *size["latents"], generator=gen).to(device)
    text = torch.randn(2 if args.cfg else 1, size["text_tokens"], cfg.text_dim, generator=gen)
    text = text.to(device, torch.bfloat16)
    sparsity = args.sparsity if args.backend == "vsa" else 0.0
    ctxs = [forward_context(model, cfg, args.backend, sparsity, noise) for model in models]

    warmup_seconds = []  # compile (CUDA: the first call) and kernel autotuning, per expert
    with torch.inference_mode():
        for index, model in enumerate(models):
            t0 = time.perf_counter()
            euler_step(model, ctxs[index], noise, text, 1.0, 0.5, GUIDANCE[index])
            _sync(device)
            warmup_seconds.append(time.perf_counter() - t0)

    resident = Experts(device)
    for model in models:
        resident.add(model)
    _reset_peak(device)
    with torch.inference_mode():
        resident_run, resident_latents = denoise(resident, ctxs, noise, text, args.steps)
    del resident

    offloaded = Experts(device, offload=True, offload_reason="bench/experts.py")
    offload_seconds = []  # each expert's copy into (pinned) host memory, once at load
    for model in models:
        t0 = time.perf_counter()
        offloaded.add(model)
        offload_seconds.append(time.perf_counter() - t0)
    _reset_peak(device)
    idle_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    with torch.inference_mode():
        offloaded_run, offloaded_latents = denoise(offloaded, ctxs, noise, text, args.steps)
    switch_seconds = [offloaded.activate_synced(1 - offloaded.active) for _ in range(args.switches)]
    expert_bytes = offloaded.expert_bytes()
    offloaded_run.update(
        expert_load_to_host_seconds=offload_seconds, device_allocated_without_experts_gib=idle_gib,
        switch_seconds=switch_seconds,
        switch_median_seconds=statistics.median(switch_seconds) if switch_seconds else None,
        switch_gb_per_s=expert_bytes / statistics.median(switch_seconds) / 1e9 if switch_seconds else None,
        latents_max_abs_diff_vs_resident=(offloaded_latents - resident_latents).abs().max().item(),
    )

    results = {
        "config": "tiny" if args.tiny else "wan2.2-t2v-a14b",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "latents": list(size["latents"]), "grid_thw": list(models[0].grid_thw(size["latents"][1:])),
        "backend": args.backend, "sparsity": sparsity if args.backend == "vsa" else None, "cfg": args.cfg,
        "steps": args.steps, "expert_gib": expert_bytes / 2**30, "build_seconds": build_seconds,
        "warmup_seconds": warmup_seconds, "resident": resident_run, "offloaded": offloaded_run,
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
