"""Two-expert models (Wan2.2 A14B): which expert and guidance scale each step uses, and where the idle expert waits.

diffusers' WanPipeline runs `transformer` (the high-noise expert) with `guidance_scale` at the steps whose timestep
t >= boundary_ratio * 1000 and `transformer_2` (the low-noise one) with `guidance_scale_2` at the others. The
schedule is decided once per request (`build_expert_schedule`), so the denoising loop only looks it up by step.
`Experts` holds the loaded DiTs; with `model.offload_experts` the idle expert's weights wait in host memory and move
to the device at the switch (one host-to-device copy of an expert; the weights never change, so nothing is copied
back). A one-expert model is the same objects with one entry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tessera.models.family import DiT
from tessera.runtime.config import GenerateConfig
from tessera.runtime.graphs import GraphedForward
from tessera.runtime.request import RequestState

__all__ = ["EXPERT_NAMES", "ExpertRun", "ExpertSchedule", "Experts", "build_expert_schedule"]

EXPERT_NAMES = ("transformer", "transformer_2")  # diffusers' component names: the high-noise, the low-noise expert
HOST = torch.device("cpu")
_ALIGN_BYTES = 64  # each host view starts on a 64-byte boundary: any dtype's alignment, whole cache lines for the DMA


@dataclass(frozen=True)
class ExpertSchedule:
    """Per step: the expert that runs (an index into `EXPERT_NAMES`) and its guidance scale."""

    expert_per_step: tuple[int, ...]
    guidance_per_step: tuple[float, ...]
    boundary_timestep: float | None  # None: one expert
    switch_steps: frozenset[int]  # step 0 and every step whose expert differs from the previous step's


def build_expert_schedule(
    cfg: GenerateConfig, timesteps: torch.Tensor, num_experts: int, num_train_timesteps: int = 1000
) -> ExpertSchedule:
    """The request's schedule from the sampler's model timesteps (int64 [num_steps], CPU).

    Two experts: diffusers' rule, `t >= boundary_ratio * num_train_timesteps` -> the high-noise expert with
    `guidance_scale`, else the low-noise one with `guidance_scale_2` (None: `guidance_scale`). The comparison is
    the same tensor op as diffusers' (int64 timesteps against a Python float), so a timestep equal to the boundary
    picks the high-noise expert in both.
    """
    num_steps = len(timesteps)
    if num_experts == 1:
        return ExpertSchedule((0,) * num_steps, (cfg.guidance_scale,) * num_steps, None, frozenset({0}))
    assert num_experts == 2 and cfg.model.boundary_ratio is not None, "two experts need model.boundary_ratio"
    boundary = cfg.model.boundary_ratio * num_train_timesteps
    high_noise = (timesteps.cpu() >= boundary).tolist()  # once per request, before the loop
    low_noise_scale = cfg.guidance_scale if cfg.guidance_scale_2 is None else cfg.guidance_scale_2
    experts = tuple(0 if high else 1 for high in high_noise)
    guidance = tuple(cfg.guidance_scale if high else low_noise_scale for high in high_noise)
    switches = frozenset(step for step in range(num_steps) if step == 0 or experts[step] != experts[step - 1])
    return ExpertSchedule(experts, guidance, boundary, switches)


class Experts:
    """The DiT(s) of a loaded pipeline: one, or two of one architecture (`add` them in `EXPERT_NAMES` order).

    Resident (`offload=False`): every expert stays on `device`. Offloaded: each expert's parameters and buffers
    live in host memory (pinned on CUDA, so the copy is a DMA) and `activate_synced(i)` gives expert i device copies,
    dropping the previously active expert's (its module then points at its host tensors again). The modules are
    never replaced, only their tensors, so request states and compiled stages built on them stay valid. On a CPU
    device the "device copies" are real copies too: the same code path runs, with host and device the same memory.
    """

    def __init__(self, device: torch.device, *, offload: bool = False, offload_reason: str = "") -> None:
        self.device, self.offload, self.offload_reason = device, offload, offload_reason
        self.models: list[DiT] = []
        self._host: list[dict[str, torch.Tensor]] = []  # offload: per expert, name -> its tensor in host memory
        self.active: int | None = None  # offload: the expert whose weights are on the device

    def add(self, model: DiT) -> None:
        """Hold the next expert (its weights on `device`). Offloaded, they move to host memory now, so the next
        expert loads into the device memory they leave."""
        if self.models:
            assert model.config == self.models[0].config, "experts must share one architecture"
        self.models.append(model)
        if not self.offload:
            return
        pin = self.device.type == "cuda"
        host = _host_copies(model, pin)
        self._host.append(host)
        _point_at(model, host)
        if pin:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @torch.inference_mode(False)  # the device copies become module parameters: plain tensors, not inference ones
    def activate_synced(self, index: int) -> float:
        """Make expert `index` runnable on the device; the seconds it took (host sync), 0.0 when nothing moved."""
        if not self.offload or self.active == index:
            return 0.0
        t0 = time.perf_counter()
        if self.active is not None:
            _point_at(self.models[self.active], self._host[self.active])  # its device copies are freed
        device_copies = {name: t.to(self.device, non_blocking=True, copy=True) for name, t in self._host[index].items()}
        _point_at(self.models[index], device_copies)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.active = index
        return time.perf_counter() - t0

    def expert_bytes(self) -> int:
        """Bytes of one expert's parameters and buffers (what one switch moves)."""
        return sum(t.numel() * t.element_size() for _, t in _named_tensors(self.models[0]))


@dataclass
class ExpertRun:
    """One request's view of the experts: the schedule, and per expert its request state and forward."""

    experts: Experts
    schedule: ExpertSchedule
    states: tuple[RequestState, ...]
    forwards: tuple[GraphedForward, ...]
    move_seconds: dict[int, float] = field(default_factory=dict)  # step -> seconds spent moving weights before it

    def cuda_graphs_report(self) -> dict:
        """The forwards' CUDA-graph reports as one (graphs summed, probes listed)."""
        reports = [forward.report() for forward in self.forwards]
        merged = dict(reports[0])
        merged["graphs"] = sum(r["graphs"] for r in reports)
        merged["capture_seconds"] = round(sum(r["capture_seconds"] for r in reports), 3)
        merged["disabled_because"] = next((r["disabled_because"] for r in reports if r["disabled_because"]), None)
        merged["probes"] = [probe for r in reports for probe in r["probes"]]
        return merged

    def report(self, cfg: GenerateConfig) -> dict:
        """The report's `experts` entry: the boundary, per step the expert and its guidance scale, the moves."""
        schedule, experts = self.schedule, self.experts
        return {
            "names": list(EXPERT_NAMES[: len(experts.models)]),
            "boundary_ratio": cfg.model.boundary_ratio,
            "boundary_timestep": schedule.boundary_timestep,
            "expert_per_step": [EXPERT_NAMES[index] for index in schedule.expert_per_step],
            "guidance_scale_per_step": list(schedule.guidance_per_step),
            "offloaded": experts.offload,
            "offload_reason": experts.offload_reason,
            "moves": [{"step": step, "expert": EXPERT_NAMES[schedule.expert_per_step[step]], "seconds": seconds}
                      for step, seconds in sorted(self.move_seconds.items()) if experts.offload],
            "move_seconds": sum(self.move_seconds.values()),
            "bytes_per_move": experts.expert_bytes() if experts.offload else 0,
        }


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _host_copies(model: torch.nn.Module, pin: bool) -> dict[str, torch.Tensor]:
    """name -> a host copy of each parameter and buffer. Pinned: views into ONE page-locked buffer per expert, as
    the pinned allocator rounds every allocation up to a power of two (per tensor, up to 2x the host memory)."""
    tensors = list(_named_tensors(model))
    if not pin:
        return {name: tensor.detach().to(HOST, copy=True) for name, tensor in tensors}
    offsets, total = [], 0
    for _, tensor in tensors:
        total = -(-total // _ALIGN_BYTES) * _ALIGN_BYTES
        offsets.append(total)
        total += tensor.numel() * tensor.element_size()
    flat = torch.empty(total, dtype=torch.uint8, device=HOST, pin_memory=True)
    host = {}
    for (name, tensor), offset in zip(tensors, offsets, strict=True):
        view = flat[offset : offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        host[name] = view.copy_(tensor.detach())
    return host


def _point_at(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Swap every parameter's and buffer's tensor for `tensors[name]` (same Parameter objects, new storage)."""
    for name, param in model.named_parameters():
        param.data = tensors[name]
    for name, _ in list(model.named_buffers()):
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, tensors[name])
