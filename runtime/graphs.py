"""CUDA-graph replay of the DiT forward: the host's launch work runs once per step plan, not once per step.

Each block launches ~20 kernels through Python (torch.compile's wrappers, four VSA launches with TMA descriptors,
the Ulysses copies). When a rank's GPU work per block gets short, the host sets the pace: one rank of an 8-rank
1.3B VSA forward took 97 ms eager and 34 ms replayed (`bench/dit_forward.py --sp 8 --cuda-graph`, fake process
group, session 5). A replay launches the whole forward at once. Build one GraphedForward per request: graphs are
keyed by the forward context's identity.

One graph per (forward context, input shapes): a request has one context per distinct step plan (dense steps,
per-step sparsity), all graphs share one memory pool (they never run at once, and each keeps only its static
inputs and output alive between replays). The first call of each records a warm-up forward (compiles and
autotunes outside the capture) whose output it returns, then captures; later calls copy the inputs into the
static buffers and replay. A capture that fails (an op that syncs, a collective that cannot be captured) is
reported once as a warning and the forward runs eagerly from then on.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def resolve_cuda_graphs(setting: str, device: torch.device, world_size: int) -> bool:
    """``model.cuda_graphs``: "true", "false" or "auto" (CUDA, one rank: the forward holds no collective).
    Under SP or CFG-parallel, "true" captures the NCCL collectives too (not yet validated on several GPUs)."""
    setting = str(setting).lower()
    if device.type != "cuda" or setting == "false":
        return False
    return setting == "true" or world_size == 1


class GraphedForward:
    """``graphed(latents, timestep, text, ctx=ctx)``: the model's forward, replayed from a CUDA graph when
    ``enabled`` (else the plain forward). Returns a fresh tensor (the static output is cloned)."""

    def __init__(self, model: torch.nn.Module, enabled: bool) -> None:
        self.model = model
        self.enabled = enabled
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self.disabled_because: str | None = None
        self._pool = None

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, *, ctx: Any):
        if not self.enabled:
            return self.model(latents, timestep, text, ctx=ctx)
        inputs = (latents, timestep, text)
        key = (id(ctx), *((x.shape, x.dtype, x.stride()) for x in inputs))
        entry = self.graphs.get(key)
        if entry is None:
            return self._capture(key, inputs, ctx)
        graph, static_inputs, static_out = entry
        for static, x in zip(static_inputs, inputs, strict=True):
            static.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor, ...], ctx: Any) -> torch.Tensor:
        static_inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (compiles, autotunes); this call's answer
            out = self.model(*static_inputs, ctx=ctx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self.model(*static_inputs, ctx=ctx)
        except Exception as exc:  # noqa: BLE001 - any capture failure: eager from now on, said once
            self.enabled = False
            self.disabled_because = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"model.cuda_graphs: capturing the forward failed ({self.disabled_because}); "
                          "the forward runs eagerly (set model.cuda_graphs=false to skip the attempt)",
                          RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            return out
        self._pool = graph.pool()
        self.graphs[key] = (graph, static_inputs, static_out)
        return out
