"""The orchestrator: config -> model, text, noise, per-request state -> denoising loop -> video + report.

`generate` runs on every rank of the mesh. All ranks hold the full latents and run the scheduler step
identically; the DiT inside shards the tokens over `sp` and the CFG branches over `cfg`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tessera.attention import VSAMetadataCache
from tessera.models import WanConfig, WanTransformer, build_wan_on_meta, load_wan_weights_, materialize_random_
from tessera.parallel import ParallelMesh, warmup_collectives
from tessera.runtime.checkpoint import resolve_checkpoint
from tessera.runtime.conditioning import draw_initial_noise
from tessera.runtime.config import GenerateConfig
from tessera.runtime.faults import NO_FAULTS, FaultPlan, inject_step_faults
from tessera.runtime.graphs import GraphedForward, resolve_cuda_graphs
from tessera.runtime.guards import (
    Interrupted,
    NonFiniteLatentsError,
    Progress,
    RankFailure,
    first_nonfinite_step_synced,
)
from tessera.runtime.output import output_files, write_json_atomic, write_latents_atomic, write_video_atomic
from tessera.runtime.plan import AttentionPlan, build_attention_plan
from tessera.runtime.precision import exact_fp32
from tessera.runtime.report import collect_provenance, gather_rank_stats
from tessera.runtime.request import RequestState, build_request_state
from tessera.runtime.scheduler import build_scheduler
from tessera.runtime.wan_components import (
    ConditioningPlan,
    build_latent_decoder,
    build_text_encoder,
    free_device_memory,
    plan_conditioning,
)
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)  # Wan VAE: 4x temporal (after the first frame), 8x spatial
FPS = 16
# The report's `stage_seconds`: text_encode includes loading the encoder, load is the DiT's weights, denoise
# includes first_step; decode and write (the video and latents, not the JSON itself) are measured on rank 0 only.
STAGES = ("load", "text_encode", "first_step", "denoise", "decode", "write", "total")
log = logging.getLogger("tessera")


@dataclass(frozen=True)
class GenerateResult:
    latents: torch.Tensor  # [B, 16, F, H/8, W/8] float32, final (before decoding)
    report: dict


def latent_shape(cfg: GenerateConfig) -> tuple[int, int, int]:
    return (cfg.num_frames - 1) // VAE_STRIDE[0] + 1, cfg.height // VAE_STRIDE[1], cfg.width // VAE_STRIDE[2]


def token_grid(cfg: GenerateConfig, model_cfg: WanConfig) -> tuple[int, int, int]:
    f, h, w = latent_shape(cfg)
    pt, ph, pw = model_cfg.patch_size
    return f // pt, h // ph, w // pw


def prepare(cfg: GenerateConfig, arch: dict, mesh: ParallelMesh) -> tuple[WanConfig, AttentionPlan]:
    """Everything checkable before weights load: model config and attention plan (the output files are checked
    earlier, on every rank, by `runtime.preflight.preflight_request`)."""
    model_cfg = WanConfig(**arch)
    dtype = getattr(torch, cfg.model.dtype)
    plan = build_attention_plan(
        cfg.attention,
        num_layers=model_cfg.num_layers,
        num_steps=cfg.num_steps,
        grid_thw=token_grid(cfg, model_cfg),
        head_dim=model_cfg.attention_head_dim,
        dtype=dtype,
        device=mesh.device,
    )
    if plan.uses_vsa and not model_cfg.gate_compress:
        # VSA blocks carry to_gate_compress; zero-initialised when the checkpoint lacks it.
        model_cfg = dataclasses.replace(model_cfg, gate_compress=True)
    return model_cfg, plan


def build_model(cfg: GenerateConfig, model_cfg: WanConfig, device: torch.device) -> tuple[WanTransformer, dict]:
    dtype = getattr(torch, cfg.model.dtype)
    model = build_wan_on_meta(model_cfg)
    if cfg.model.path is None:
        materialize_random_(model, seed=cfg.seed, device=device, dtype=dtype)
        load_info = {"weights": "random", "seed": cfg.seed}
    else:
        weights = resolve_checkpoint(cfg.model.path).weights  # transformer/ of a diffusers directory
        report = load_wan_weights_(model, weights, device=device, dtype=dtype)
        load_info = {"weights": cfg.model.path, "zero_initialised": list(report.zero_initialised)}
    load_info["parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        model.compile_blocks()  # fuses the token-local elementwise work; compiled once, on the first step
    return model.eval(), load_info


def generate(cfg: GenerateConfig, arch: dict, mesh: ParallelMesh, faults: FaultPlan = NO_FAULTS) -> GenerateResult:
    """Run one request on this rank; rank 0 writes the video, the JSON report and optionally the latents.

    Any exception is re-raised as `RankFailure` (a KeyboardInterrupt as `Interrupted`) naming this rank and
    the phase: "config", "load", "step N" (0-based), "decode" or "write", with the original as its cause.
    Nothing is decoded or written unless every rank's latents stayed finite; the three output files land
    together or not at all. `faults` is for tests only (runtime/faults.py).
    """
    progress = Progress()
    try:
        with exact_fp32(getattr(torch, cfg.model.dtype), mesh.device):  # fp32 means no TF32 (runtime/precision.py)
            return _generate(cfg, arch, mesh, faults, progress)
    except KeyboardInterrupt as err:
        raise Interrupted.at(err, mesh.rank, progress.phase) from err
    except Exception as err:
        raise RankFailure(mesh.rank, progress.phase, err) from err


@torch.inference_mode()
def _generate(
    cfg: GenerateConfig, arch: dict, mesh: ParallelMesh, faults: FaultPlan, progress: Progress
) -> GenerateResult:
    t_start = time.perf_counter()
    model_cfg, plan = prepare(cfg, arch, mesh)
    conditioning = plan_conditioning(cfg)  # real UMT5 + VAE or the tiny stand-ins; fails before weight load
    device, is_main = mesh.device, mesh.rank == 0
    provenance = collect_provenance(device)
    _reset_peak_memory(device)
    progress.stage = "load"
    faults.fire_phase("load", mesh.rank)

    dtype, use_cfg = getattr(torch, cfg.model.dtype), cfg.guidance_scale != 1.0
    prompts = [cfg.prompt, cfg.negative_prompt] if use_cfg else [cfg.prompt]
    text, model, load_info, stage_seconds = _load(cfg, model_cfg, conditioning, prompts, mesh)
    if cfg.parallel.cfg == 2:
        text = text[mesh.cfg_rank : mesh.cfg_rank + 1]  # rank 0 of the cfg axis: cond, rank 1: uncond

    latents = draw_initial_noise(1, cfg.num_frames, cfg.height, cfg.width, cfg.seed, LATENT_CHANNELS).to(device)
    scheduler = build_scheduler(cfg.scheduler, cfg.num_steps, cfg.flow_shift)
    scheduler.prepare(device, torch.float32)
    timesteps = scheduler.timesteps.to(device)
    state = build_request_state(model, plan, token_grid(cfg, model_cfg), mesh, VSAMetadataCache())
    graphs = resolve_cuda_graphs(cfg.model.cuda_graphs, device, mesh.world_size)
    forward = GraphedForward(model, enabled=graphs != "never", adaptive=graphs == "adaptive")
    warmup_collectives(mesh)
    t_loop = time.perf_counter()

    step_seconds = []
    batch = text.shape[0]
    step_faults = faults.step_faults(mesh.rank)
    finite_steps = torch.ones(cfg.num_steps, dtype=torch.bool, device=device)  # read once, after the loop
    progress.stage = "step"
    with logging_redirect_tqdm():  # log lines above the bar, not through it
        for step in tqdm(range(cfg.num_steps), desc="denoising", disable=not is_main, leave=True):
            t0 = time.perf_counter()
            progress.step = step
            if step in step_faults:
                latents = inject_step_faults(step_faults[step], latents, step, mesh.rank)
            timestep = timesteps[step].expand(batch)
            model_in = latents.to(dtype).expand(batch, -1, -1, -1, -1)
            pred = forward(model_in, timestep, text, ctx=state.context_for_step(step)).float()
            if use_cfg:
                cond, uncond = _cfg_branches(pred, mesh)
                pred = uncond + cfg.guidance_scale * (cond - uncond)
            latents = scheduler.step(pred, step, latents)
            finite_steps[step] = torch.isfinite(latents).all()  # on the device: no host sync per step
            step_seconds.append(_elapsed_synced(t0, device))
            if step == 0:  # the blocks compile on the first step (CUDA): worth knowing before the loop ends
                _log_main(mesh, "first step (compile) %.2f s", step_seconds[0])
    stage_seconds["first_step"], stage_seconds["denoise"] = step_seconds[0], time.perf_counter() - t_loop
    nonfinite = first_nonfinite_step_synced(finite_steps)  # also a barrier before rank 0 writes
    if nonfinite is not None:
        progress.step = nonfinite[0]
        raise NonFiniteLatentsError(*nonfinite)
    # Every rank, once per request (never per step): rank 0 alone goes on to decode and write.
    ranks = gather_rank_stats({"rank": mesh.rank, "step_seconds": step_seconds,
                               "peak_memory_bytes": _peak_memory(device), "device": str(device)}, mesh)
    progress.stage = "decode"

    report = _build_report(cfg, model_cfg, mesh, plan, state, load_info)
    report.update(provenance=provenance, ranks=ranks, step_seconds=step_seconds,
                  denoise_seconds=stage_seconds["denoise"], stage_seconds=stage_seconds, cuda_graphs=forward.report())
    del forward  # its graphs hold the forward's activations in their memory pool
    if is_main:
        del model, state  # the VAE decode needs the memory more than the finished DiT
        free_device_memory(device)
        _write_outputs(progress, faults, cfg, latents, report, t_start, device, conditioning)
    return GenerateResult(latents=latents, report=report)


def _load(
    cfg: GenerateConfig, model_cfg: WanConfig, conditioning: ConditioningPlan, prompts: list[str], mesh: ParallelMesh
) -> tuple[torch.Tensor, WanTransformer, dict, dict[str, float | None]]:
    """Text embeddings [B, L, text_dim] (one row per prompt), the DiT, its load info and stage seconds.

    Text first, so the encoder is freed before the DiT loads (peak = max of the two, not the sum). The stage
    seconds have every key of the report's `stage_seconds`; those of later stages are None until measured.
    """
    device, dtype = mesh.device, getattr(torch, cfg.model.dtype)
    stage_seconds: dict[str, float | None] = dict.fromkeys(STAGES)
    t0 = time.perf_counter()
    text_encoder = build_text_encoder(
        conditioning, model_cfg.text_dim, cfg.seed, device, dtype, show_progress=mesh.is_main
    )
    text = text_encoder.encode(prompts).to(device=device, dtype=dtype)
    del text_encoder
    free_device_memory(device)
    stage_seconds["text_encode"] = _elapsed_synced(t0, device)  # loading the encoder included
    _log_main(mesh, "text encoded in %.2f s", stage_seconds["text_encode"])

    t0 = time.perf_counter()
    model, load_info = build_model(cfg, model_cfg, device)
    stage_seconds["load"] = _elapsed_synced(t0, device)
    _log_main(mesh, "weights loaded: %.2f GiB in %.2f s", load_info["parameter_bytes"] / 2**30, stage_seconds["load"])
    return text, model, load_info, stage_seconds


def _build_report(
    cfg: GenerateConfig, model_cfg: WanConfig, mesh: ParallelMesh, plan: AttentionPlan, state: RequestState,
    load_info: dict,
) -> dict:
    """The request's part of the JSON report; the loop's measurements are added by the caller."""
    return {
        "config": asdict(cfg),
        "architecture": asdict(model_cfg),
        "world_size": mesh.world_size,
        "sp": mesh.sp_size,
        "cfg": mesh.cfg_size,
        "device": str(mesh.device),
        "weights": load_info,
        "token_grid": list(state.grid_thw),
        "num_tokens": state.seq_plan.seq_len,
        "attention": {
            "backend": plan.backend,
            "reason": plan.reason,
            "backend_per_block": [list(blocks) for blocks in plan.blocks_per_step],
            "sparsity_per_step": list(plan.sparsity_per_step),
        },
    }


def _cfg_branches(pred: torch.Tensor, mesh: ParallelMesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) noise predictions: from the batch (cfg=1) or one exchange over the cfg axis (cfg=2)."""
    if mesh.cfg_size == 1:
        return pred[0:1], pred[1:2]
    gathered = [torch.empty_like(pred) for _ in range(mesh.cfg_size)]
    dist.all_gather(gathered, pred.contiguous(), group=mesh.cfg_group)
    return gathered[0], gathered[1]


def _write_outputs(
    progress: Progress,
    faults: FaultPlan,
    cfg: GenerateConfig,
    latents: torch.Tensor,
    report: dict,
    t_start: float,
    device: torch.device,
    conditioning: ConditioningPlan,
) -> None:
    """Rank 0: decode, then write the video, the latents (optionally) and last the report, all or none."""
    stage_seconds = report["stage_seconds"]
    t0 = time.perf_counter()
    decoder = build_latent_decoder(conditioning, cfg.seed, device)
    faults.fire_phase("decode", 0)  # only rank 0 decodes and writes
    frames = decoder.decode(latents)[0]
    progress.stage = "write"
    del decoder
    stage_seconds["decode"] = _elapsed_synced(t0, device)
    log.info("decode %.2f s", stage_seconds["decode"])
    report["conditioning"] = {"text_encoder": conditioning.text, "decoder": conditioning.decoder}
    (out, _), (report_path, _), *latents_path = output_files(cfg.output.path, cfg.output.save_latents)
    report["peak_memory_bytes"] = _peak_memory(device)  # rank 0's, the decode included
    report["latent_shape"] = list(latents.shape)
    report["video"] = {"path": str(out), "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                       "width": int(frames.shape[2]), "fps": FPS}
    written: list[Path] = []
    t0 = time.perf_counter()
    try:  # all files or none: a failure (disk full, interrupt) removes those already written
        written.append(write_video_atomic(out, frames.cpu().numpy(), fps=FPS, overwrite=cfg.output.overwrite))
        for path, _ in latents_path:
            written.append(write_latents_atomic(path, latents.float().cpu(), overwrite=cfg.output.overwrite))
        faults.fire_phase("write", 0)
        stage_seconds["write"] = time.perf_counter() - t0
        report["total_seconds"] = stage_seconds["total"] = time.perf_counter() - t_start
        written.append(write_json_atomic(report_path, report, overwrite=cfg.output.overwrite))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d frames, %.1f s total)", out, frames.shape[0], report["total_seconds"])


def _log_main(mesh: ParallelMesh, msg: str, *args: object) -> None:
    """One INFO line per job, not per rank: every rank runs the same phase, rank 0 says so."""
    if mesh.is_main:
        log.info(msg, *args)


def _elapsed_synced(t0: float, device: torch.device) -> float:
    """Seconds since t0; forces a device sync (once per step) so step times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
