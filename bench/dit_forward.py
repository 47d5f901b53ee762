"""One Wan DiT forward on one GPU: time, attention share, layout share, peak memory; dense vs VSA (vs SLA), bf16
(vs FP8 block linears).

    python bench/dit_forward.py --preset 1.3b --out bench_dit.json [--diffusers] [--sparsity 0.9] [--sp 2 4 8]
        [--sla-topk 0.1] [--fp8 [--quality-steps 10]] [--stages fast compiled composite]

Random bf16 weights, B=1, latents for 480x832x81 (Wan2.1 1.3B), 720x1280x81 (14B: Wan2.1 14B, or one Wan2.2 A14B
expert, the same architecture) or 704x1280x121 (ti2v5b: Wan2.2 TI2V-5B, 48-channel latents of the Wan2.2 VAE, 16x
spatial: 31x44x80, a 31x22x40 token grid; one timestep for every token, as text-to-video). The attention share comes
from CUDA events around every self-attention call inside the real forward; the layout share times the
token permutation into and out of tile order at the same shapes, plus (sp > 1) the Ulysses packing copies.
With --diffusers, diffusers' WanTransformer3DModel (SDPA, cuDNN backend) runs the same forward with the
same weights as the reference. --sla-topk adds SLA runs (random per-layer proj_l). --fp8 then quantises the
blocks' linears (models/fp8.py) and times every backend again; with --quality-steps N both the bf16 and the FP8
model run the same N-step flow-matching Euler loop (shift 3, one conditional forward a step, VSA at the first
--sparsity) from the same noise, and the final latents' relative error is reported.

--sp N: one rank's share of an N-rank sequence-parallel forward on this ONE GPU. A fake process group
(torch's testing backend "fake": this process is rank 0 of N, collectives return at once and move nothing)
stands in for NCCL, so the rank computes on its token shard and head slice and does every layout copy,
but nothing is communicated: the time is the rank's compute and layout work, a bound on scaling without
the all-to-alls. The packing time comes from CUDA events around the copies of every Ulysses call.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import time
from pathlib import Path

import torch
from _timing import cuda_time_ms  # noqa: E402
from tessera.attention import MetadataCache  # noqa: E402
from tessera.attention.vsa import on_device  # noqa: E402
from tessera.models.fp8 import quantize_blocks_fp8_  # noqa: E402
from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_  # noqa: E402
from tessera.parallel import build_mesh  # noqa: E402
from tessera.runtime import AttentionConfig, build_attention_plan  # noqa: E402
from tessera.runtime.request import build_request_state  # noqa: E402

# Latents: `channels` x ((frames - 1) / 4 + 1) x (height / vae) x (width / vae); the Wan2.1 VAE (16 channels, 8x
# spatial) or the Wan2.2 one (48 channels, 16x spatial), both 4x temporal. The DiT's in/out channels are `channels`.
SHAPES = {
    "1.3b": dict(heads=12, layers=30, ffn=8960, channels=16, vae=8, frames=81, height=480, width=832),
    "14b": dict(heads=40, layers=40, ffn=13824, channels=16, vae=8, frames=81, height=720, width=1280),
    "ti2v5b": dict(heads=24, layers=30, ffn=14336, channels=48, vae=16, frames=121, height=704, width=1280),
}


STAGE_MODES = ("fast", "compiled", "composite")


def model_config(shape: dict, sla_proj_l: bool = False) -> WanConfig:
    """The DiT of a SHAPES entry (head dim 128, patch (1, 2, 2), UMT5 text, VSA's gate)."""
    return WanConfig(
        patch_size=(1, 2, 2), num_attention_heads=shape["heads"], attention_head_dim=128,
        in_channels=shape["channels"], out_channels=shape["channels"], text_dim=4096, freq_dim=256,
        ffn_dim=shape["ffn"], num_layers=shape["layers"], gate_compress=True, sla_proj_l=sla_proj_l,
    )


def random_inputs(shape: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [1, C, F, H, W] bf16, timestep [1], text [1, 512, 4096] bf16) of a SHAPES entry, seed 0."""
    gen = torch.Generator("cpu").manual_seed(0)
    f, h, w = (shape["frames"] - 1) // 4 + 1, shape["height"] // shape["vae"], shape["width"] // shape["vae"]
    latents = torch.randn(1, shape["channels"], f, h, w, generator=gen).to(device, torch.bfloat16)
    text = torch.randn(1, 512, 4096, generator=gen).to(device, torch.bfloat16)
    return latents, torch.tensor([500.0], device=device), text


class _TimedAttention:
    """Wraps a SelfAttention callable and records CUDA events around each call (no host sync)."""

    def __init__(self, inner, events: list):
        self.inner, self.events, self.uses_gate = inner, events, inner.uses_gate

    def __call__(self, q, k, v, gate):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.inner(q, k, v, gate)
        end.record()
        self.events.append((start, end))
        return out


class _MemoryProbe:
    """Wraps a SelfAttention callable: splits the forward's peak memory into inside / outside attention calls."""

    def __init__(self, inner, peaks: dict):
        self.inner, self.peaks, self.uses_gate = inner, peaks, inner.uses_gate

    def __call__(self, q, k, v, gate):
        self.peaks["outside"] = max(self.peaks["outside"], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        out = self.inner(q, k, v, gate)
        self.peaks["attention"] = max(self.peaks["attention"], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        return out


_PACKING = ("_pack_by_heads", "_pack_output", "_unpack_by_heads")  # Ulysses' copies (parallel/ulysses.py)


def packing_ms(model, ctx, inputs) -> float:
    """Milliseconds of the Ulysses packing copies in one forward: CUDA events around each copy method."""
    events: list = []

    def timed(method):
        def call(*args):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = method(*args)
            end.record()
            events.append((start, end))
            return out
        return call

    wrappers = {id(a): a for a in ctx.attn}.values()  # one UlyssesAttention per backend, shared by blocks
    for attn in wrappers:
        for name in _PACKING:
            setattr(attn, name, timed(getattr(attn, name)))
    try:
        model(*inputs, ctx=ctx)
        torch.cuda.synchronize()
    finally:
        for attn in wrappers:
            for name in _PACKING:
                delattr(attn, name)  # back to the class's methods
    return sum(s.elapsed_time(e) for s, e in events)


def forward_context(model, cfg: WanConfig, backend: str, sparsity: float, latents, sp: int = 1):
    """The step-0 forward context of a one-step plan: `sparsity` is VSA's, or SLA's top-k for backend sla."""
    device = latents.device
    grid = (latents.shape[2], latents.shape[3] // 2, latents.shape[4] // 2)
    keys = {"sla_topk": sparsity} if backend == "sla" else {"sparsity": sparsity}
    plan = build_attention_plan(
        AttentionConfig(backend=backend, **keys), num_layers=cfg.num_layers, num_steps=1,
        grid_thw=grid, head_dim=cfg.attention_head_dim, dtype=torch.bfloat16, device=device,
    )
    mesh = build_mesh(cfg=1, sp=sp, device=device)
    return build_request_state(model, plan, grid, mesh, MetadataCache()).context_for_step(0)


def bench_ours(model, cfg: WanConfig, backend: str, sparsity: float, inputs, iters: int, sp: int = 1,
               graphs: bool = False) -> dict:
    device = torch.device("cuda")
    latents, timestep, text = inputs
    ctx = forward_context(model, cfg, backend, sparsity, latents, sp)
    t0 = time.perf_counter()
    model(latents, timestep, text, ctx=ctx)  # compile + Triton autotune (its benchmark buffers) before the peak
    torch.cuda.synchronize()
    first_forward_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    forward_ms = cuda_time_ms(lambda: model(latents, timestep, text, ctx=ctx), iters=iters)
    peak = torch.cuda.max_memory_allocated()
    # the tensors' own bytes at the peak: the allocated figure above also counts a cached block's unsplit remainder
    peak_requested = torch.cuda.memory_stats()["requested_bytes.all.peak"]

    events: list = []
    timed = dataclasses.replace(ctx, attn=tuple(_TimedAttention(a, events) for a in ctx.attn))
    model(latents, timestep, text, ctx=timed)
    torch.cuda.synchronize()
    attention_ms = sum(s.elapsed_time(e) for s, e in events)

    peaks = {"outside": 0, "attention": 0}
    probed = dataclasses.replace(ctx, attn=tuple(_MemoryProbe(a, peaks) for a in ctx.attn))
    torch.cuda.reset_peak_memory_stats()
    model(latents, timestep, text, ctx=probed)
    torch.cuda.synchronize()
    peaks["outside"] = max(peaks["outside"], torch.cuda.max_memory_allocated())

    layout_ms = 0.0
    if ctx.token_order is not None:
        num_tokens = ctx.token_order.numel()
        x = torch.randn(1, num_tokens, cfg.num_attention_heads * cfg.attention_head_dim, device=device,
                        dtype=torch.bfloat16)
        y = torch.randn(1, num_tokens, cfg.out_channels * math.prod(cfg.patch_size), device=device,
                        dtype=torch.bfloat16)  # proj_out channels
        layout_ms = cuda_time_ms(lambda: (x[:, on_device(ctx.token_order, x.device)],  # as the forward does
                                          y[:, on_device(ctx.token_order_inverse, y.device)]), 2, 10)
    graphed_ms = None
    if graphs:  # the same forward replayed from a CUDA graph (runtime/graphs.py): no host launch work
        from tessera.runtime.graphs import GraphedForward

        graphed = GraphedForward(model, enabled=True)
        graphed_ms = cuda_time_ms(lambda: graphed(latents, timestep, text, ctx=ctx), iters=iters)
        assert graphed.graphs, graphed.disabled_because
        del graphed
        gc.collect()  # the graphs' pool must be gone before the next backend's peak is measured
        # and the cuBLAS workspaces of the capture's side stream (allocated tensors too: about 66 MiB on an H100,
        # which a VSA run measured after a graphed dense run once counted in its peak)
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
    packing = packing_ms(model, ctx, inputs) if sp > 1 else 0.0
    layout_ms += packing
    return {
        "backend": backend, "sparsity": sparsity if backend == "vsa" else None,
        "sla_topk": sparsity if backend == "sla" else None, "sp": sp,
        "packing_ms": packing, "first_forward_s": first_forward_s,
        "forward_ms": forward_ms, "graphed_forward_ms": graphed_ms, "attention_ms": attention_ms,
        "attention_share": attention_ms / forward_ms,
        "layout_ms": layout_ms, "layout_share": layout_ms / forward_ms, "peak_gib": peak / 2**30,
        "peak_bytes": peak, "peak_requested_bytes": peak_requested,
        "peak_inside_attention_gib": peaks["attention"] / 2**30, "peak_outside_attention_gib": peaks["outside"] / 2**30,
    }


def diffusers_reference(model, cfg: WanConfig, device: torch.device):
    """diffusers' WanTransformer3DModel of `cfg` in bf16 on `device`, holding `model`'s weights (VSA's gate and SLA's
    proj_l left out). Built on the device: in fp32 on the host a 14B model would take 57 GB and a slow CPU init."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        ref = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            cross_attn_norm=cfg.cross_attn_norm, qk_norm=cfg.qk_norm, eps=cfg.eps,
            rope_max_seq_len=cfg.rope_max_seq_len,
        )
    ref = ref.to(dtype=torch.bfloat16).eval()
    ours = {k: v for k, v in model.state_dict().items() if "to_gate_compress" not in k and "proj_l" not in k}
    ref.load_state_dict(ours, strict=True)
    return ref


def bench_diffusers(model, cfg: WanConfig, inputs, iters: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ref = diffusers_reference(model, cfg, torch.device("cuda"))
    latents, timestep, text = inputs
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out_ref = ref(latents, timestep, text, return_dict=False)[0]
        ms = cuda_time_ms(lambda: ref(latents, timestep, text, return_dict=False), iters=iters)
    return {"forward_ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "out": out_ref}


def euler_latents(model, cfg: WanConfig, inputs, steps: int, sparsity: float) -> torch.Tensor:
    """Final latents of `steps` flow-matching Euler steps (sigmas 1 -> 0, shift 3, one conditional forward a step,
    VSA at `sparsity`) from the bf16 noise in `inputs`: the same loop for the bf16 and the FP8 model."""
    latents, _, text = inputs
    ctx = forward_context(model, cfg, "vsa", sparsity, latents)
    raw = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = 3.0 * raw / (1.0 + 2.0 * raw)
    x = latents.float()
    for i in range(steps):
        t = torch.tensor([sigmas[i].item() * 1000.0], device=x.device)
        v = model(x.to(torch.bfloat16), t, text, ctx=ctx).float()
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    return x


def time_ffn_up(model, cfg: WanConfig, latents) -> dict:
    """One block's FFN up-projection + GELU(tanh) at the forward's token count: the GEMM then a GELU kernel,
    and the GEMM with cuBLASLt's bias + GELU epilogue (what the model runs on CUDA)."""
    import torch.nn.functional as F
    from tessera.models.wan.transformer import linear_gelu_tanh

    tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
    x = torch.randn(1, tokens, cfg.dim, device="cuda", dtype=torch.bfloat16)
    proj = model.blocks[0].ffn.net[0].proj
    return {"separate_gelu": cuda_time_ms(lambda: F.gelu(proj(x), approximate="tanh"), 3, 10),
            "fused_epilogue": cuda_time_ms(lambda: linear_gelu_tanh(x, proj), 3, 10)}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(SHAPES), default="1.3b")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    parser.add_argument("--diffusers", action="store_true")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards (median) after 2 warm-ups")
    parser.add_argument("--stages", nargs="+", choices=STAGE_MODES, default=["fast"],
                        help="token-local stages: fast (Triton ops, eager: the runtime's default), compiled (also "
                             "torch.compile: model.compile=true), composite (plain torch ops); each times all backends")
    parser.add_argument("--sp", type=int, nargs="+", default=[1],
                        help="sequence-parallel degrees; > 1: one rank's work under a fake process group (see above)")
    parser.add_argument("--cuda-graph", action="store_true", help="also time the forward replayed from a CUDA graph")
    parser.add_argument("--sla-topk", type=float, nargs="*", default=[], help="also time SLA at these top-k")
    parser.add_argument("--fp8", action="store_true", help="then quantise the block linears to FP8 and time again")
    parser.add_argument("--quality-steps", type=int, default=0,
                        help="with --fp8: final-latent error of an N-step Euler run, FP8 vs bf16")
    parser.add_argument("--quality-only", action="store_true",
                        help="with --fp8 --quality-steps: only that comparison, no timed forwards")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.diffusers and args.sp != [1]:
        parser.error("--diffusers compares the whole forward: run it with --sp 1")
    torch._dynamo.config.recompile_limit = 64  # one process, many shapes (--sp): every stage compiles per shape
    shape = SHAPES[args.preset]
    cfg = model_config(shape, sla_proj_l=bool(args.sla_topk))
    device = torch.device("cuda")
    model = build_wan_on_meta(cfg)
    materialize_random_(model, seed=0, device=device, dtype=torch.bfloat16)
    model.eval()
    set_stages(model, args.stages[0])
    inputs = random_inputs(shape, device)
    latents = inputs[0]

    results = {"preset": args.preset, "shape": shape, "gpu": torch.cuda.get_device_name(), "runs": []}
    if args.quality_only:
        bench_fp8(model, cfg, args, inputs, results, timed=False)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
        return
    results["ffn_up_gelu_ms"] = time_ffn_up(model, cfg, latents)
    print(json.dumps({"ffn_up_gelu_ms": results["ffn_up_gelu_ms"]}))
    for sp in args.sp:
        if sp > 1:
            from torch.testing._internal.distributed.fake_pg import FakeStore

            torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=sp)
        for stages in args.stages:
            set_stages(model, stages)
            runs = all_backends(model, cfg, args, inputs, sp)
            for run in runs:
                run["stages"] = stages
                run["speedup_vs_our_dense"] = runs[0]["forward_ms"] / run["forward_ms"]
                print(json.dumps(run))
            results["runs"] += runs
        set_stages(model, args.stages[0])
        if sp > 1:
            torch.distributed.destroy_process_group()
    if args.diffusers:
        ours_out = model(*inputs, ctx=None)
        ref = bench_diffusers(model, cfg, inputs, args.iters)
        err = ((ours_out.float() - ref.pop("out").float()).norm() / ours_out.float().norm()).item()
        ref["rel_err_vs_ours_dense"] = err
        ref["our_dense_speedup"] = ref["forward_ms"] / results["runs"][0]["forward_ms"]
        results["diffusers"] = ref
        print(json.dumps({"diffusers": ref}))
    if args.fp8:
        bench_fp8(model, cfg, args, inputs, results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def set_stages(model, mode: str) -> None:
    """One of STAGE_MODES for the token-local block stages."""
    if mode == "composite":
        model.use_fast_stages(compile=False)
        model._fused_ops = False  # the plain torch ops (what CPUs run)
    else:
        model.use_fast_stages(compile=mode == "compiled")


def all_backends(model, cfg: WanConfig, args, inputs, sp: int = 1) -> list[dict]:
    """Our dense forward, then VSA at each --sparsity, then SLA at each --sla-topk."""
    runs = [bench_ours(model, cfg, "dense", 0.0, inputs, args.iters, sp, args.cuda_graph)]
    runs += [bench_ours(model, cfg, "vsa", s, inputs, args.iters, sp, args.cuda_graph) for s in args.sparsity]
    runs += [bench_ours(model, cfg, "sla", t, inputs, args.iters, sp, args.cuda_graph) for t in args.sla_topk]
    return runs


def bench_fp8(model, cfg: WanConfig, args, inputs, results: dict, timed: bool = True) -> None:
    """Quantise the loaded model's block linears in place, time every backend again (ratios against the bf16 dense
    forward of this run) and, with --quality-steps, the final-latent error of an N-step run against bf16."""
    reference = None
    if args.quality_steps:
        reference = euler_latents(model, cfg, inputs, args.quality_steps, args.sparsity[0])
    report = quantize_blocks_fp8_(model)
    torch.cuda.empty_cache()
    results["fp8"] = {"quant": report.as_dict(), "runs": all_backends(model, cfg, args, inputs) if timed else []}
    for run in results["fp8"]["runs"]:
        run["speedup_vs_bf16_dense"] = results["runs"][0]["forward_ms"] / run["forward_ms"]
        print(json.dumps({"fp8": run}))
    if reference is not None:
        got = euler_latents(model, cfg, inputs, args.quality_steps, args.sparsity[0])
        err = ((got - reference).norm() / reference.norm()).item()
        results["fp8"]["latents_rel_err_vs_bf16"] = {"steps": args.quality_steps, "vsa_sparsity": args.sparsity[0],
                                                     "rel_err": err}
        print(json.dumps({"fp8_latents_rel_err_vs_bf16": err, "steps": args.quality_steps}))


if __name__ == "__main__":
    main()
