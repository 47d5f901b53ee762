"""Flow-matching samplers for Wan2.1: multistep UniPC (diffusers-exact) and plain Euler (DMD: runtime/samplers.py).

Both share one shifted sigma schedule, computed on the CPU in float64 exactly as diffusers'
`UniPCMultistepScheduler(use_flow_sigmas=True)` does, so every rank derives identical numbers. All per-step
coefficients are precomputed at construction; `step()` only runs tensor arithmetic on the sample's device
(no `.item()`, no host syncs). Call `prepare(device, dtype)` before the loop: one host-to-device copy.
The initial latents come from the sampler too (`initial_noise`): WanPipeline's draw for these two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tessera.models.family import DEFAULT_LATENTS, LatentFormat, latent_shape
from torch import Tensor

__all__ = [
    "FlowEulerScheduler",
    "FlowScheduler",
    "FlowUniPCScheduler",
    "build_scheduler",
    "flow_sigmas_and_timesteps",
]

SCHEDULER_NAMES = ("unipc", "euler")


class FlowScheduler(Protocol):
    """What the denoising loop needs from a sampler (one object per request)."""

    name: str  # the config's `scheduler`
    uses_cfg: bool  # False: distilled without CFG (config validation then requires guidance_scale=1)
    num_steps: int
    timesteps: Tensor  # [num_steps] int64 (CPU): the model timestep of each step, as the DiT sees it
    sigmas: Tensor  # [num_steps + 1] float32 (CPU): noise level before each step, last entry 0

    def initial_noise(self, batch: int, num_frames: int, height: int, width: int,
                      latents: LatentFormat = DEFAULT_LATENTS) -> Tensor: ...

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> None: ...

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor: ...

    def reset(self) -> None: ...

    def describe(self) -> dict: ...


class _DiffusersNoise:
    """Initial latents and the report entry shared by the UniPC and Euler samplers."""

    name: str
    uses_cfg = True
    seed: int
    timesteps: Tensor
    sigmas: Tensor
    flow_shift: float

    def initial_noise(self, batch: int, num_frames: int, height: int, width: int,
                      latents: LatentFormat = DEFAULT_LATENTS) -> Tensor:
        """float32 [batch, C, F, H/s, W/s] on the CPU (the VAE's `latents` format), as WanPipeline draws it for
        `seed`."""
        return draw_initial_noise(batch, num_frames, height, width, self.seed, latents)

    def describe(self) -> dict:
        """For the report: the model timestep and the sigma of each step."""
        return {"name": self.name, "timesteps": self.timesteps.tolist(), "sigmas": self.sigmas[:-1].tolist(),
                "flow_shift": self.flow_shift, "uses_cfg": self.uses_cfg}


def _np_linspace_f64(start: float, stop: float, num: int) -> Tensor:
    # numpy's linspace (i * step + start, last = stop); torch.linspace rounds differently in the 2nd half.
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    grid = torch.arange(num, dtype=torch.float64) * step + start
    grid[-1] = stop
    return grid


def flow_sigmas_and_timesteps(
    num_steps: int, flow_shift: float, num_train_timesteps: int = 1000
) -> tuple[Tensor, Tensor]:
    """Shifted flow sigmas and model timesteps, bit-identical to diffusers' UniPC with `use_flow_sigmas`.

    sigma' = shift * s / (1 + (shift - 1) * s) on s = linspace(1, 1/T, num_steps + 1)[:-1] (float64);
    the first sigma is nudged to 1 - 1e-6 (diffusers does so to keep log(alpha) finite);
    timesteps = int64(sigma * T) (truncated); a final sigma 0 is appended.
    Returns (sigmas float32 [num_steps + 1], timesteps int64 [num_steps]).
    """
    s = _np_linspace_f64(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
    s = flow_shift * s / (1 + (flow_shift - 1) * s)
    if abs(float(s[0]) - 1) < 1e-6:
        s[0] -= 1e-6
    timesteps = (s * num_train_timesteps).to(torch.int64)
    sigmas = torch.cat([s, s.new_zeros(1)]).to(torch.float32)
    return sigmas, timesteps


def _check_common(num_steps: object, flow_shift: object) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is invalid: set num_steps to an integer >= 1 (e.g. 50)")
    if (
        isinstance(flow_shift, bool)
        or not isinstance(flow_shift, (int, float))
        or not (math.isfinite(flow_shift) and flow_shift > 0)
    ):
        raise ValueError(
            f"flow_shift={flow_shift!r} is invalid: set flow_shift to a finite number > 0 "
            "(Wan2.1 uses 3.0 at 480p, 5.0 at 720p)"
        )


def _lambda(sigma: Tensor) -> Tensor:
    # Flow parametrisation: alpha = 1 - sigma; lambda = log(alpha) - log(sigma) (log-SNR / 2).
    return torch.log(1 - sigma) - torch.log(sigma)


@dataclass
class _Update:
    """Coefficients of one UniP (predictor) or UniC (corrector) update, all 0-d tensors.

    x_new = x_coef * x - m0_coef * m0 - res_coef * residual, where residual combines the divided differences
    D_k = (m_k - m0) / rks[k] with weights rhos (see diffusers `multistep_uni_{p,c}_bh_update`).
    """

    x_coef: Tensor  # sigma_t / sigma_s0
    m0_coef: Tensor  # alpha_t * h_phi_1
    res_coef: Tensor  # alpha_t * B(h)
    rks: list[Tensor]  # order - 1 ratios (lambda_si - lambda_s0) / h
    rhos: Tensor  # predictor: [order - 1] (empty at order 1); corrector: [order]

    def flat(self) -> list[Tensor]:
        return [self.x_coef, self.m0_coef, self.res_coef, *self.rks]

    def rebuilt(self, scalars: Sequence[Tensor], rhos: Tensor) -> _Update:
        return _Update(scalars[0], scalars[1], scalars[2], list(scalars[3:]), rhos)


def _uni_update(
    sigmas: Tensor,
    t_idx: int,
    s0_idx: int,
    history_idx: Sequence[int],
    order: int,
    bh2: bool,
    corrector: bool,
) -> _Update:
    """Mirror of diffusers' UniPC B(h) coefficient math on CPU float32 0-d tensors (same op order)."""
    sigma_t, sigma_s0 = sigmas[t_idx], sigmas[s0_idx]
    alpha_t = 1 - sigma_t
    lambda_t, lambda_s0 = _lambda(sigma_t), _lambda(sigma_s0)
    h = lambda_t - lambda_s0
    rks = [(_lambda(sigmas[si]) - lambda_s0) / h for si in history_idx]
    rks_all = torch.stack([*rks, torch.ones(())])
    hh = -h  # predict_x0
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    b_h = torch.expm1(hh) if bh2 else hh
    r_rows, b = [], []
    for i in range(1, order + 1):
        r_rows.append(torch.pow(rks_all, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    r_mat, b_vec = torch.stack(r_rows), torch.stack(b)
    if corrector:
        rhos = torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(r_mat, b_vec)
    elif order == 1:
        rhos = torch.zeros(0)
    elif order == 2:
        rhos = torch.ones(1) * 0.5
    else:
        rhos = torch.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
    return _Update(sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h, rks, rhos)


@dataclass
class _StepPlan:
    sigma: Tensor  # sigma_i, for x0 = sample - sigma_i * v
    predictor: _Update
    corrector: _Update | None  # None at step 0 and where disabled


class FlowUniPCScheduler(_DiffusersNoise):
    """UniPC multistep predictor-corrector (B(h)=bh2, data prediction) for flow-matching models.

    Matches diffusers' `UniPCMultistepScheduler` as Wan2.1 configures it (prediction_type="flow_prediction",
    use_flow_sigmas=True, predict_x0=True, final_sigmas_type="zero", timestep_spacing="linspace") to the bit
    on CPU. Stateful: keeps the last `solver_order` data predictions and the pre-predictor sample; create one
    per request (or call `reset()`), and call `step` with step_index 0, 1, ..., num_steps - 1 in order.
    `seed` is only that of the initial noise (`initial_noise`).
    """

    name = "unipc"

    def __init__(
        self,
        num_steps: int,
        flow_shift: float,
        solver_order: int = 2,
        *,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        num_train_timesteps: int = 1000,
        seed: int = 0,
    ) -> None:
        _check_common(num_steps, flow_shift)
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={solver_order!r} is invalid: use 1, 2 or 3 (Wan2.1 uses 2)")
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type={solver_type!r} is invalid: use 'bh2' (Wan2.1) or 'bh1'")
        self.num_steps = num_steps
        self.flow_shift = float(flow_shift)
        self.seed = seed
        self.solver_order = solver_order
        self.sigmas, self.timesteps = flow_sigmas_and_timesteps(
            num_steps, float(flow_shift), num_train_timesteps
        )
        disabled = set(disable_corrector)
        bh2 = solver_type == "bh2"
        orders = [
            min(solver_order, num_steps - i if lower_order_final else solver_order, i + 1)
            for i in range(num_steps)
        ]
        self._cpu_plans: list[_StepPlan] = []
        for i in range(num_steps):
            pred = _uni_update(
                self.sigmas, i + 1, i, [i - k for k in range(1, orders[i])], orders[i], bh2, False
            )
            corr = None
            if i > 0 and (i - 1) not in disabled:
                o = orders[i - 1]  # the corrector reuses the order of the previous predictor
                corr = _uni_update(self.sigmas, i, i - 1, [i - 1 - k for k in range(1, o)], o, bh2, True)
            self._cpu_plans.append(_StepPlan(self.sigmas[i], pred, corr))
        self._plans: list[_StepPlan] = self._cpu_plans
        self._plans_key: tuple[torch.device, torch.dtype] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the multistep history (start a new trajectory with step_index 0)."""
        self._model_outputs: list[Tensor | None] = [None] * self.solver_order
        self._last_sample: Tensor | None = None
        self._next_step_index = 0

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Move all step coefficients to `device` in two copies (rhos cast to the sample `dtype`).

        Call once before the loop; `step` calls it itself when the device or dtype changes (one sync then).
        """
        device = _canonical(device)
        if self._plans_key == (device, dtype):
            return
        scalars, rhos, layout = [], [], []
        for plan in self._cpu_plans:
            ups = [plan.predictor] + ([plan.corrector] if plan.corrector is not None else [])
            scalars.append(plan.sigma)
            for up in ups:
                flat = up.flat()
                layout.append((len(flat), up.rhos.numel()))
                scalars.extend(flat)
                rhos.append(up.rhos)
        flat_dev = torch.stack(scalars).to(device)
        rhos_dev = torch.cat(rhos).to(device=device, dtype=dtype)
        plans, si, ri, li = [], 0, 0, 0
        for plan in self._cpu_plans:
            sigma = flat_dev[si]
            si += 1
            ups = []
            for up in [plan.predictor] + ([plan.corrector] if plan.corrector is not None else []):
                n_flat, n_rhos = layout[li]
                li += 1
                ups.append(
                    up.rebuilt([flat_dev[j] for j in range(si, si + n_flat)], rhos_dev[ri : ri + n_rhos])
                )
                si += n_flat
                ri += n_rhos
            plans.append(_StepPlan(sigma, ups[0], ups[1] if len(ups) > 1 else None))
        self._plans, self._plans_key = plans, (device, dtype)

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        """One denoising step. model_output: velocity v [B, C, F, H, W]; sample: x_t, same shape.

        Returns x at sigma_{step_index + 1}, dtype of `sample`. No host syncs once `prepare` has run.
        """
        if step_index != self._next_step_index:
            raise ValueError(
                f"step_index={step_index} but the scheduler expects {self._next_step_index}: "
                "call step with 0, 1, ... in order, and reset() (or a new scheduler) per request"
            )
        self.prepare(sample.device, sample.dtype)
        plan = self._plans[step_index]
        x0 = sample - plan.sigma * model_output  # flow prediction -> data prediction
        if plan.corrector is not None and self._last_sample is not None:
            sample = self._corrector(plan.corrector, x0)
        self._model_outputs = [*self._model_outputs[1:], x0]
        self._last_sample = sample
        prev_sample = self._predictor(plan.predictor, sample)
        self._next_step_index += 1
        return prev_sample

    def _divided_differences(self, rks: list[Tensor], m0: Tensor) -> Tensor | None:
        if not rks:
            return None
        outs = self._model_outputs
        # rks[k] pairs with the (k+2)-th newest stored prediction, as in diffusers.
        return torch.stack([(outs[-(k + 2)] - m0) / rk for k, rk in enumerate(rks)], dim=1)

    def _predictor(self, up: _Update, x: Tensor) -> Tensor:
        m0 = self._model_outputs[-1]
        x_t_ = up.x_coef * x - up.m0_coef * m0
        d1s = self._divided_differences(up.rks, m0)
        pred_res = 0 if d1s is None else torch.einsum("k,bkc...->bc...", up.rhos, d1s)
        return (x_t_ - up.res_coef * pred_res).to(x.dtype)

    def _corrector(self, up: _Update, model_t: Tensor) -> Tensor:
        # Called before the history shift: _model_outputs[-1] is the previous step's prediction.
        x = self._last_sample
        m0 = self._model_outputs[-1]
        x_t_ = up.x_coef * x - up.m0_coef * m0
        d1s = self._divided_differences(up.rks, m0)
        corr_res = 0 if d1s is None else torch.einsum("k,bkc...->bc...", up.rhos[:-1], d1s)
        return (x_t_ - up.res_coef * (corr_res + up.rhos[-1] * (model_t - m0))).to(x.dtype)


class FlowEulerScheduler(_DiffusersNoise):
    """First-order flow sampler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v, computed in >= fp32.

    Uses the same sigmas and timesteps as `FlowUniPCScheduler`, so switching samplers changes only the update.
    Note: diffusers' `FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n)` uses a different grid (its
    last sigma is shift-applied twice and its first is exactly 1); it equals this sampler only when given
    these sigmas explicitly with shift=1 (the tests check that). `seed`: of the initial noise only.
    """

    name = "euler"

    def __init__(self, num_steps: int, flow_shift: float, *, num_train_timesteps: int = 1000, seed: int = 0) -> None:
        _check_common(num_steps, flow_shift)
        self.num_steps = num_steps
        self.flow_shift = float(flow_shift)
        self.seed = seed
        self.sigmas, self.timesteps = flow_sigmas_and_timesteps(
            num_steps, float(flow_shift), num_train_timesteps
        )
        self._dt_cpu = self.sigmas[1:] - self.sigmas[:-1]
        self._dt = self._dt_cpu
        self._device: torch.device | None = None

    def reset(self) -> None:
        """Stateless; present for protocol symmetry."""

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> None:
        device = _canonical(device)
        if self._device != device:
            self._dt, self._device = self._dt_cpu.to(device), device

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        """x at sigma_{step_index + 1} from velocity `model_output`; returns the dtype of `sample`."""
        self.prepare(sample.device, sample.dtype)
        compute = torch.promote_types(sample.dtype, torch.float32)
        prev = sample.to(compute) + self._dt[step_index] * model_output.to(compute)
        return prev.to(sample.dtype)


def build_scheduler(
    name: str, num_steps: int, flow_shift: float, *, seed: int = 0
) -> FlowUniPCScheduler | FlowEulerScheduler:
    """Flow sampler by config name: "unipc" (Wan2.1 default, solver_order 2) or "euler"; `seed` of the initial
    noise. The DMD sampler has its own arguments: `runtime.samplers.build_sampler` builds any from a config."""
    if name == "unipc":
        return FlowUniPCScheduler(num_steps, flow_shift, seed=seed)
    if name == "euler":
        return FlowEulerScheduler(num_steps, flow_shift, seed=seed)
    raise ValueError(f"scheduler={name!r} is unknown: set scheduler to one of {list(SCHEDULER_NAMES)} (dmd: "
                     "runtime.samplers.DMDSampler)")


def _canonical(device: torch.device | str) -> torch.device:
    """"cuda" -> "cuda:<current>", so prepare("cuda") and a sample on cuda:0 share one cache key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def draw_initial_noise(
    batch: int, num_frames: int, height: int, width: int, seed: int, latents: LatentFormat = DEFAULT_LATENTS
) -> Tensor:
    """Initial latents exactly as WanPipeline draws them with `generator=Generator("cpu").manual_seed(seed)`.

    Returns float32 [batch, latents.channels, (num_frames - 1)//4 + 1, height//s, width//s] on the CPU (s the
    VAE's spatial stride; move it to the device afterwards: drawing on the CPU keeps every rank and platform
    identical).
    """
    for key, value in (("batch", batch), ("num_frames", num_frames), ("height", height), ("width", width)):
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")
    f, h, w = latent_shape(num_frames, height, width, latents)
    if h < 1 or w < 1:
        raise ValueError(f"height={height} and width={width} must be at least {latents.spatial_stride}")
    gen = torch.Generator("cpu").manual_seed(seed)
    # randn_tensor(shape, generator=cpu_gen, dtype=float32) with one generator = one torch.randn on the CPU.
    return torch.randn((batch, latents.channels, f, h, w), generator=gen, dtype=torch.float32)
