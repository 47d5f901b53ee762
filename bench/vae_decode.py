"""Wan VAE decode: diffusers' `AutoencoderKLWan.decode` vs ours (the row-parallel decoder), side by side in one run.

    python bench/vae_decode.py --out vae.json                          # one GPU: 480x832x81, the Wan2.1 VAE
    torchrun --nproc_per_node=2 bench/vae_decode.py --out vae_sp2.json  # ours split over 2 GPUs, gathered on rank 0
    python bench/vae_decode.py --smoke --out /tmp/vae_smoke.json       # tiny VAE and shapes on the CPU

Random weights (`AutoencoderKLWan()`: the Wan2.1 VAE architecture, seed 0) and random latents [1, 16, F, H/8, W/8].
For fp32 and bf16: seconds (median of --iters after one warm-up) and peak device memory of diffusers' decode and of
ours (`build_row_parallel_vae` over the ranks; on one rank its halo pads are plain zero pads), ours' max relative
difference to diffusers (fp32: ~0, it is exact), and each bf16 decode's error vs the fp32 frames.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tessera.models.wan.vae import build_row_parallel_vae, conv_weights_channels_last
from tessera.parallel import (
    build_mesh,
    build_row_split,
    destroy_process_group_safely,
    init_process_group_from_env,
    warmup_collectives,
)

SMOKE_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[[], torch.Tensor | None], device: torch.device, iters: int) -> tuple[object, dict]:
    """(fn's last output, {seconds: median wall seconds, first_seconds: the warm-up call's, peak_memory_bytes})."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return out, {"seconds": statistics.median(times), "first_seconds": first, "peak_memory_bytes": peak}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = a.float() - ref.float()
    return {"max_rel": (diff.abs().max() / ref.float().abs().max()).item(),
            "norm_rel": (diff.norm() / ref.float().norm()).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also decode in bf16 (--no-bf16 on CPUs, where bf16 convolutions crawl)")
    parser.add_argument("--smoke", action="store_true", help="tiny VAE, 9x32x48, on the CPU")
    parser.add_argument("--variants", action="store_true",
                        help="also time ours in bf16 with channels_last_3d weights, cudnn.benchmark and both (GPU)")
    args = parser.parse_args()
    if args.smoke:
        args.frames, args.height, args.width = 9, 32, 48
    _, _, _, device = init_process_group_from_env(600.0, device_type="cpu" if args.smoke else None)
    try:
        result = run(args, device)
    finally:
        destroy_process_group_safely()
    if result is not None:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


@torch.inference_mode()
def run(args: argparse.Namespace, device: torch.device) -> dict | None:
    from diffusers import AutoencoderKLWan

    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = build_mesh(cfg=1, sp=world, device=device)
    warmup_collectives(mesh)  # communicator set-up stays out of the timings
    torch.manual_seed(0)
    vae32 = AutoencoderKLWan(**(SMOKE_VAE if args.smoke else {})).to(device).eval()
    shape = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    rows = build_row_split(shape[3], mesh)
    result: dict = {"device": str(device), "world_size": world, "decode_ranks": rows.num_ranks,
                    "latent_shape": list(shape), "vae_parameter_bytes": sum(p.numel() * 4 for p in vae32.parameters())}

    def ours(vae: AutoencoderKLWan, z: torch.Tensor) -> Callable[[], torch.Tensor | None]:
        parallel = build_row_parallel_vae(vae, rows)

        def decode() -> torch.Tensor | None:
            if not rows.holds_rows:
                return None
            block = parallel.decode(rows.shard(z, dim=3), return_dict=False)[0]
            return block if rows.num_ranks == 1 else rows.gather(block, dim=3)
        return decode

    frames = {}
    dtypes = (torch.float32, torch.bfloat16) if args.bf16 else (torch.float32,)
    for dtype in dtypes:
        vae = vae32 if dtype == torch.float32 else copy.deepcopy(vae32).to(dtype)
        z, name = latents.to(dtype), str(dtype).removeprefix("torch.")
        frames["diffusers", name], result[f"diffusers_{name}"] = _measure(
            lambda vae=vae, z=z: vae.decode(z, return_dict=False)[0], device, args.iters)
        frames["ours", name], result[f"ours_{name}"] = _measure(ours(vae, z), device, args.iters)
    if args.variants and dtypes[-1] == torch.bfloat16:
        # cuDNN's autotuner and channels-last weights, each alone and together (the runtime decodes 16-bit with
        # channels-last weights and the autotuner off). first_seconds: the first decode, which pays the
        # autotuner's search for each new shape.
        z = latents.to(torch.bfloat16)
        vae_cl = copy.deepcopy(vae)
        conv_weights_channels_last(vae_cl)
        for variant, model, benchmark in (("channels_last", vae_cl, False), ("cudnn_benchmark", vae, True),
                                          ("channels_last_cudnn_benchmark", vae_cl, True)):
            torch.backends.cudnn.benchmark = benchmark
            frames["ours", variant], result[f"ours_bfloat16_{variant}"] = _measure(ours(model, z), device,
                                                                                   args.iters)
        torch.backends.cudnn.benchmark = False
    if not mesh.is_main:
        return None
    for variant in (("channels_last", "cudnn_benchmark", "channels_last_cudnn_benchmark") if args.variants and args.bf16
                    else ()):
        result[f"ours_{variant}_vs_ours_bfloat16"] = _rel(frames["ours", variant], frames["ours", "bfloat16"])
        result[f"ours_{variant}_vs_float32"] = _rel(frames["ours", variant], frames["diffusers", "float32"])
    result["ours_vs_diffusers_float32"] = _rel(frames["ours", "float32"], frames["diffusers", "float32"])
    for impl in ("diffusers", "ours") if args.bf16 else ():
        result[f"{impl}_bfloat16_vs_float32"] = _rel(frames[impl, "bfloat16"], frames[impl, "float32"])
    reference = frames["diffusers", "float32"]
    result["frames_clamped_fraction"] = (reference.abs() >= 1).float().mean().item()  # error on clamped pixels is 0
    result["video_shape"] = list(reference.shape)
    return result


if __name__ == "__main__":
    main()
