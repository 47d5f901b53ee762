"""FastWan's DMD sampler (few-step distilled checkpoints) and `build_sampler`, the request's sampler from its config.

`DMDSampler` reproduces FastVideo's `WanDMDPipeline` denoising stage: at each listed timestep t the DiT sees t
itself; sigma is the entry of the shift-8 flow-matching training table nearest to t; x0 = x_t - sigma * v; every
step but the last re-noises x0 to the next sigma with a fresh draw from the request's CPU generator; the output is
the last x0. No CFG. It has the interface of the flow samplers in `runtime.scheduler` (`FlowScheduler`).
Shape legend: B batch, C channels, F latent frames, H/W latent height/width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tessera.models.family import DEFAULT_LATENTS, LatentFormat, latent_shape
from tessera.runtime.config import GenerateConfig, check_dmd_timesteps
from tessera.runtime.scheduler import FlowScheduler, build_scheduler
from torch import Tensor

__all__ = ["DMD_TRAIN_SHIFT", "DMDSampler", "build_sampler", "dmd_sigma_table"]

# FastVideo builds the DMD stage's FlowMatchEulerDiscreteScheduler with shift 8.0 whatever `flow_shift` says.
DMD_TRAIN_SHIFT = 8.0
NUM_TRAIN_TIMESTEPS = 1000


def build_sampler(cfg: GenerateConfig) -> FlowScheduler:
    """The sampler of one request (a new object per request: DMD's noise generator is seeded with `cfg.seed`)."""
    if cfg.scheduler == "dmd":
        return DMDSampler(cfg.dmd_timesteps, seed=cfg.seed)
    return build_scheduler(cfg.scheduler, cfg.num_steps, cfg.flow_shift, seed=cfg.seed)


def dmd_sigma_table(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = DMD_TRAIN_SHIFT
) -> tuple[Tensor, Tensor]:
    """The flow-matching training table: (sigmas, grid timesteps), float32 [num_train_timesteps], k = T, ..., 1.

    raw = k / T; sigma = raw * shift / (raw * (shift - 1) + 1); grid_t = sigma * T, all float32 ops in that
    order: bit-identical to diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift)` `.sigmas` / `.timesteps`
    as constructed (before any `set_timesteps`), which FastVideo's DMD stage indexes.
    """
    raw = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
    sigmas = raw * shift / (raw * (shift - 1) + 1)
    return sigmas, sigmas * num_train_timesteps


def _nearest_indices(grid_t: Tensor, timesteps: Tensor) -> Tensor:
    """Per timestep, the index of the nearest grid entry (float64 distances; the first index on ties, as argmin)."""
    return torch.argmin((grid_t.double()[None, :] - timesteps.double()[:, None]).abs(), dim=1)


class DMDSampler:
    """DMD few-step sampler: listed timesteps, x0 prediction, re-noising between steps, no CFG.

    Per step i (sigma_i from the shift-8 table at the listed timestep t_i, never shifted again):
    x0 = x_t - sigma_i * v, computed in float64 and rounded once to float32; for i < n - 1 the next input is
    (1 - sigma_{i+1}) * x0 + sigma_{i+1} * noise_{i+1} (float32, in that order); at i = n - 1 the result is x0.
    Noise: one `Generator("cpu").manual_seed(seed)` per request gives the initial latents and then one draw after
    every step but the last, each `draw_dmd_noise` (randn in [B, F, C, H, W] order). The draws do not depend on
    the model, so `initial_noise` makes them all at once and `prepare` moves them to the device before the loop.
    Call `initial_noise` once per request (`reset()` starts over from the seed), then `step` with 0, 1, ... n-1.
    """

    name = "dmd"
    uses_cfg = False  # distilled without CFG: one conditional forward per step

    def __init__(
        self, timesteps: Sequence[int], *, seed: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    ) -> None:
        check_dmd_timesteps(timesteps, num_train_timesteps)
        self.num_steps = len(timesteps)
        self.seed = seed
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.int64)  # what the DiT sees, as listed
        table, grid_t = dmd_sigma_table(num_train_timesteps)
        sigma = table[_nearest_indices(grid_t, self.timesteps)]  # float32 [num_steps]
        self.sigmas = torch.cat([sigma, sigma.new_zeros(1)])  # [num_steps + 1]: the result x0 is at sigma 0
        # x0 uses sigma in float64; re-noising uses float32 (1 - sigma) and sigma, as FastVideo's add_noise.
        self._cpu_coefs = (sigma.double(), 1 - sigma, sigma)
        self._generator = torch.Generator("cpu")
        self.reset()

    def reset(self) -> None:
        """Start a new trajectory: the generator back at `seed`, no noise drawn yet."""
        self._generator.manual_seed(self.seed)
        self._renoise_cpu: list[Tensor] | None = None
        self._renoise: list[Tensor] | None = None

    def initial_noise(self, batch: int, num_frames: int, height: int, width: int,
                      latents: LatentFormat = DEFAULT_LATENTS) -> Tensor:
        """Initial latents float32 [batch, C, F, H/s, W/s] (the VAE's `latents` format) on the CPU; also draws the
        re-noise draws.

        Batch 1 only. FastVideo draws sample b's initial noise from its own generator seeded with seed + b (every
        re-noise draw, of the whole batch, from sample 0's); that is not wired here, as the pipeline runs B = 1.
        """
        if batch != 1:
            raise ValueError(f"the DMD sampler draws noise for batch 1 only, got batch={batch} (FastVideo seeds "
                             "sample b with seed + b; not implemented)")
        if self._renoise_cpu is not None:
            raise RuntimeError("initial_noise was already drawn for this request: call reset() or build a new sampler")
        shape = (batch, latents.channels, *latent_shape(num_frames, height, width, latents))
        draws = [draw_dmd_noise(self._generator, shape) for _ in range(self.num_steps)]
        self._renoise_cpu = draws[1:]
        return draws[0]

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Move the coefficients and the re-noise draws to `device` (one copy each, before the loop).

        `dtype` is the sample's: the arithmetic dtypes are fixed by the semantics (float64 x0, float32 re-noise).
        """
        if self._renoise_cpu is None:
            raise RuntimeError("call initial_noise before prepare: the re-noise draws follow the initial one")
        sigma64, keep, level = (coef.to(device) for coef in self._cpu_coefs)
        self._sigma64, self._keep, self._level = sigma64, keep, level
        self._renoise = [noise.to(device) for noise in self._renoise_cpu]

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        """model_output: velocity v [B, C, F, H, W]; sample: x_t, same shape. Returns the next step's input (the
        final x0 at the last step) in the dtype of `sample`. No host syncs once `prepare` has run."""
        if self._renoise is None:
            self.prepare(sample.device, sample.dtype)
        x0 = (sample.double() - self._sigma64[step_index] * model_output.double()).float()
        if step_index == self.num_steps - 1:
            return x0.to(sample.dtype)
        nxt = step_index + 1
        return (self._keep[nxt] * x0 + self._level[nxt] * self._renoise[step_index]).to(sample.dtype)

    def describe(self) -> dict:
        """For the report: the listed timesteps and the sigma of each step."""
        return {"name": self.name, "timesteps": self.timesteps.tolist(), "sigmas": self.sigmas[:-1].tolist(),
                "sigma_table_shift": DMD_TRAIN_SHIFT, "uses_cfg": self.uses_cfg}


def draw_dmd_noise(generator: torch.Generator, shape_BCFHW: tuple[int, int, int, int, int]) -> Tensor:
    """One noise draw as FastVideo's DMD stage makes it: `torch.randn((B, F, C, H, W), float32)` from `generator`
    (frames before channels: the stage holds latents as [B, F, C, H, W]), returned as contiguous [B, C, F, H, W].

    `generator` is a CPU generator (the same numbers on every rank and platform); move the result to the device
    afterwards. The draw order differs from `draw_initial_noise`, so the same seed gives other noise.
    """
    b, c, f, h, w = shape_BCFHW
    noise_BFCHW = torch.randn((b, f, c, h, w), generator=generator, dtype=torch.float32)
    return noise_BFCHW.permute(0, 2, 1, 3, 4).contiguous()
