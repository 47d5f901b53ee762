"""Flow samplers against diffusers: schedules equal, full sampling loops equal (fp32 / fp64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tessera.runtime.scheduler import FlowEulerScheduler, FlowUniPCScheduler, build_scheduler

diffusers = pytest.importorskip("diffusers")

STEPS = (1, 2, 5, 10, 50)
SHIFTS = (3.0, 5.0)
SHAPE = (1, 16, 3, 6, 10)


def _diffusers_unipc(num_steps: int, shift: float, solver_order: int = 2):
    # Wan2.1's scheduler_config.json (Wan-AI/Wan2.1-T2V-*-Diffusers), flow_shift varied.
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=solver_order,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
        disable_corrector=[],
    )
    sched.set_timesteps(num_steps, device="cpu")
    sched.set_begin_index(0)  # as WanPipeline does
    return sched


class _FakeModel:
    """Fixed random linear velocity field v = W x * (1 + t/1000) + b * t/1000 (deterministic)."""

    def __init__(self, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.w = (torch.randn(16, 16, generator=gen) / 4).to(dtype)
        self.b = torch.randn(1, 16, 1, 1, 1, generator=gen).to(dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype) / 1000
        return torch.einsum("oc,bcfhw->bofhw", self.w, x) * (1 + tt) + self.b * tt


def _initial(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).to(dtype)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_unipc_schedule_matches_diffusers(num_steps: int, shift: float) -> None:
    ref = _diffusers_unipc(num_steps, shift)
    ours = FlowUniPCScheduler(num_steps, shift)
    assert ours.timesteps.dtype == ref.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert ours.sigmas[-1] == 0 and len(ours.sigmas) == num_steps + 1


def _run_both(num_steps: int, shift: float, dtype: torch.dtype, solver_order: int = 2):
    ref = _diffusers_unipc(num_steps, shift, solver_order)
    ours = FlowUniPCScheduler(num_steps, shift, solver_order)
    model = _FakeModel(dtype)
    x_ref = x_ours = _initial(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, t in enumerate(ref.timesteps):
            x_ref = ref.step(model(x_ref, t), t, x_ref, return_dict=False)[0]
            x_ours = ours.step(model(x_ours, ours.timesteps[i]), i, x_ours)
    return x_ref, x_ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_unipc_sampling_loop_matches_diffusers(num_steps: int, shift: float, dtype: torch.dtype) -> None:
    x_ref, x_ours = _run_both(num_steps, shift, dtype)
    assert x_ours.dtype == dtype and torch.isfinite(x_ours).all()
    assert not torch.allclose(x_ours, _initial(dtype))
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5 * x_ref.abs().max().item())


@pytest.mark.parametrize("num_steps", [3, 10])
def test_unipc_order3_matches_diffusers(num_steps: int) -> None:
    x_ref, x_ours = _run_both(num_steps, 5.0, torch.float32, solver_order=3)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5 * x_ref.abs().max().item())


def test_unipc_mixed_precision_model_output() -> None:
    """fp32 latents with a bf16 model output (as the runtime may pass) stay fp32 and match diffusers."""
    ref = _diffusers_unipc(5, 3.0)
    ours = FlowUniPCScheduler(5, 3.0)
    model = _FakeModel(torch.float32)
    x_ref = x_ours = _initial(torch.float32)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(model(x_ref, t).bfloat16(), t, x_ref, return_dict=False)[0]
        x_ours = ours.step(model(x_ours, t).bfloat16(), i, x_ours)
    assert x_ours.dtype == torch.float32
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


def test_unipc_reset_and_order_check() -> None:
    sched = FlowUniPCScheduler(4, 3.0)
    model = _FakeModel(torch.float32)

    def run() -> torch.Tensor:
        x = _initial(torch.float32)
        for i in range(sched.num_steps):
            x = sched.step(model(x, sched.timesteps[i]), i, x)
        return x

    first = run()
    with pytest.raises(ValueError, match="step_index"):
        sched.step(first, 0, first)  # history from the previous trajectory is still there
    sched.reset()
    assert torch.equal(run(), first)
    fresh = FlowUniPCScheduler(4, 3.0)
    with pytest.raises(ValueError, match="step_index=1"):
        fresh.step(first, 1, first)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("num_steps", [1, 2, 10])
def test_euler_matches_formula_and_diffusers(num_steps: int, shift: float) -> None:
    ours = FlowEulerScheduler(num_steps, shift)
    unipc = FlowUniPCScheduler(num_steps, shift)
    assert torch.equal(ours.sigmas, unipc.sigmas) and torch.equal(ours.timesteps, unipc.timesteps)
    # diffusers' own FlowMatchEuler grid differs (see the class docstring); fed our sigmas with shift=1 it
    # must give the same trajectory.
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(
        sigmas=ours.sigmas[:-1].tolist(), timesteps=ours.timesteps.float().tolist(), device="cpu"
    )
    ref.set_begin_index(0)
    assert torch.equal(ref.sigmas, ours.sigmas)
    model = _FakeModel(torch.float32)
    x_ref = x_ours = x_manual = _initial(torch.float32)
    for i in range(num_steps):
        t = ours.timesteps[i]
        x_ref = ref.step(model(x_ref, t), ref.timesteps[i], x_ref, return_dict=False)[0]
        x_ours = ours.step(model(x_ours, t), i, x_ours)
        x_manual = x_manual + (ours.sigmas[i + 1] - ours.sigmas[i]) * model(x_manual, t)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_ours, x_manual, rtol=1e-6, atol=1e-7)


def test_build_scheduler() -> None:
    assert isinstance(build_scheduler("unipc", 5, 3.0), FlowUniPCScheduler)
    assert isinstance(build_scheduler("euler", 5, 3.0), FlowEulerScheduler)
    with pytest.raises(ValueError, match="scheduler='ddim'"):
        build_scheduler("ddim", 5, 3.0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            build_scheduler("unipc", bad, 3.0)  # type: ignore[arg-type]
    for bad_shift in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="flow_shift"):
            build_scheduler("euler", 5, bad_shift)


@pytest.mark.gpu
def test_unipc_step_has_no_host_sync() -> None:
    sched = FlowUniPCScheduler(6, 5.0)
    device = torch.device("cuda")
    sched.prepare(device, torch.float32)
    x = _initial(torch.float32).to(device)
    w = torch.randn(16, 16, device=device) / 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(sched.num_steps):
            x = sched.step(torch.einsum("oc,bcfhw->bofhw", w, x), i, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()
