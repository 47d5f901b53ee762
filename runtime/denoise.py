"""The denoising loop of one request, on every rank: per step the expert's forward, CFG, the sampler step.

All ranks hold the full latents and run the sampler step identically; the DiT inside shards the tokens over `sp` and
the CFG branches over `cfg`.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from tessera.models.family import TEXT_ONLY, ImageCondition
from tessera.parallel import ParallelMesh
from tessera.runtime.experts import ExpertRun
from tessera.runtime.faults import inject_step_faults
from tessera.runtime.guards import NonFiniteLatentsError, first_nonfinite_step_synced
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["cfg_branches", "denoise", "elapsed_synced", "log_main"]
log = logging.getLogger("tessera")


def denoise(cfg, latents, text, scheduler, run: ExpertRun, faults, progress, mesh, dtype, on_step=None,
             image_cond: ImageCondition = TEXT_ONLY):
    """The hot loop: per step a forward (with the step's attention context and, I2V, the image condition), CFG, the
    scheduler step, then `on_step(step, num_steps)` if given (it may raise `Cancelled`). Returns (final latents, step
    seconds, loop seconds); NonFiniteLatentsError after the loop if any rank went NaN/Inf."""
    device = mesh.device
    timesteps, batch = scheduler.timesteps.to(device), text.shape[0]
    expert_per_step, guidance_per_step = run.schedule.expert_per_step, run.schedule.guidance_per_step
    step_faults = faults.step_faults(mesh.rank)
    finite_steps = torch.ones(cfg.num_steps, dtype=torch.bool, device=device)  # read once, after the loop
    step_seconds: list[float] = []
    progress.stage = "step"
    t_loop = time.perf_counter()
    with logging_redirect_tqdm():  # log lines above the bar, not through it
        for step in tqdm(range(cfg.num_steps), desc="denoising", disable=not mesh.is_main, leave=True):
            if step in run.schedule.switch_steps:  # outside the step's time: an offloaded expert's weights move
                run.move_seconds[step] = run.experts.activate_synced(expert_per_step[step])
            t0 = time.perf_counter()
            progress.step = step
            if step in step_faults:
                latents = inject_step_faults(step_faults[step], latents, step, mesh.rank)
            timestep = timesteps[step].expand(batch)
            model_in = image_cond.model_input(latents, dtype, batch)  # I2V: + mask, first-frame channels; TI2V: frame 0
            expert = expert_per_step[step]
            pred = run.forwards[expert](model_in, timestep, text, image_cond.embeds_BIC,
                                        ctx=run.states[expert].context_for_step(step)).float()
            if cfg.guidance_scale != 1.0:
                cond, uncond = cfg_branches(pred, mesh)
                pred = uncond + guidance_per_step[step] * (cond - uncond)
            latents = scheduler.step(pred, step, latents)
            finite_steps[step] = torch.isfinite(latents).all()  # on the device: no host sync per step
            step_seconds.append(elapsed_synced(t0, device))
            if step == 0:  # the blocks compile on the first step (CUDA): worth knowing before the loop ends
                log_main(mesh, "first step (compile) %.2f s", step_seconds[0])
            if on_step is not None:  # after the step's timing: a server's hook (progress, cancel) is not timed
                on_step(step, cfg.num_steps)
    loop_seconds = time.perf_counter() - t_loop
    nonfinite = first_nonfinite_step_synced(finite_steps)  # also a barrier before rank 0 decodes
    if nonfinite is not None:
        progress.step = nonfinite[0]
        raise NonFiniteLatentsError(*nonfinite)
    return latents, step_seconds, loop_seconds


def cfg_branches(pred: torch.Tensor, mesh: ParallelMesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) noise predictions: from the batch (cfg=1) or one exchange over the cfg axis (cfg=2)."""
    if mesh.cfg_size == 1:
        return pred[0:1], pred[1:2]
    gathered = [torch.empty_like(pred) for _ in range(mesh.cfg_size)]
    dist.all_gather(gathered, pred.contiguous(), group=mesh.cfg_group)
    return gathered[0], gathered[1]


def log_main(mesh: ParallelMesh, msg: str, *args: object) -> None:
    """One INFO line per job, not per rank: every rank runs the same phase, rank 0 says so."""
    if mesh.is_main:
        log.info(msg, *args)


def elapsed_synced(t0: float, device: torch.device) -> float:
    """Seconds since t0; forces a device sync (once per step) so step times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
