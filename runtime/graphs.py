"""CUDA-graph replay of the DiT forward: the host's launch work runs once per step plan, not once per step.

Each block launches ~20 kernels through Python (torch.compile's wrappers, four VSA launches with TMA descriptors,
the Ulysses copies). When a rank's GPU work per block gets short, the host sets the pace: one rank of an 8-rank
1.3B VSA forward took 97 ms eager and 34 ms replayed (`bench/dit_forward.py --sp 8 --cuda-graph`, fake process
group, H200). A replay launches the whole forward at once. Build one GraphedForward per request: graphs are
keyed by the forward context's identity.

One graph per (forward context, input shapes): a request has one context per distinct step plan (dense steps,
per-step sparsity), all graphs share one memory pool (they never run at once, and each keeps only its static
inputs and output alive between replays). Capturing costs a warm-up forward plus the capture, 3.6 s at 1.3B /
480p on an H200 (the report's `cuda_graphs.capture_seconds`), and saves only where the host sets the pace:
``adaptive`` (``model.cuda_graphs=auto``) times the second eager call of each plan (the first compiles) and
captures from the third only when issuing the forward took the host most of the time the GPU took to finish it
(``host_bound``). The first
captured call returns a warm-up forward's output; later calls copy the inputs into the static buffers and replay.
A capture that fails (an op that syncs, a collective that cannot be captured) is reported once as a warning and
the forward runs eagerly from then on.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch


def resolve_cuda_graphs(setting: str, device: torch.device, world_size: int) -> str:
    """``model.cuda_graphs`` -> "always", "adaptive" or "never". "true": always (under SP or CFG-parallel the
    NCCL collectives are captured too, not yet validated on several GPUs); "auto": adaptive on CUDA with one
    rank (the forward holds no collective); "false", or no CUDA: never."""
    setting = str(setting).lower()
    if device.type != "cuda" or setting == "false":
        return "never"
    if setting == "true":
        return "always"
    return "adaptive" if world_size == 1 else "never"


def host_bound(host_seconds: float, span_seconds: float) -> bool:
    """Whether a forward that took ``host_seconds`` to issue and ``span_seconds`` from its first launch to its last
    kernel's end (CUDA events, GPU idle before) was paced by the host: then the span barely outlasts the issuing
    (a GPU-bound 1.3B forward at one rank issues in about a fifth of its span)."""
    return host_seconds >= 0.8 * span_seconds


class GraphedForward:
    """``graphed(latents, timestep, text, image, ctx=ctx)``: the model's forward, replayed from a CUDA graph when
    ``enabled`` (else the plain forward); ``image`` (I2V's CLIP states) is None for text-only models. Returns a fresh
    tensor (the static output is cloned)."""

    def __init__(self, model: torch.nn.Module, enabled: bool, adaptive: bool = False) -> None:
        self.model = model
        self.enabled = enabled
        self.adaptive = adaptive
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self.disabled_because: str | None = None
        self.probes: dict[tuple, dict] = {}  # adaptive: per plan and shape, the timed eager call and the decision
        self._calls: dict[tuple, int] = {}
        self._pool = None
        self.capture_seconds = 0.0  # warm-up forwards and captures, host time (they run inside a step)

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 image: torch.Tensor | None = None, *, ctx: Any):
        inputs = (latents, timestep, text) if image is None else (latents, timestep, text, image)
        if not self.enabled:
            return self.model(*inputs, ctx=ctx)
        key = (id(ctx), *((x.shape, x.dtype, x.stride()) for x in inputs))
        entry = self.graphs.get(key)
        if entry is None:
            if self.adaptive:
                out = self._eager_unless_host_bound(key, inputs, ctx)
                if out is not None:
                    return out
            return self._capture(key, inputs, ctx)
        graph, static_inputs, static_out = entry
        for static, x in zip(static_inputs, inputs, strict=True):
            static.copy_(x)
        graph.replay()
        return static_out.clone()

    def _eager_unless_host_bound(self, key: tuple, inputs: tuple[torch.Tensor, ...], ctx: Any):
        """Adaptive mode: the eager forward's output while the plan is untimed (first call: compiles), being timed
        (second call) or found GPU-bound; None once a timed call found it host-bound (capture now)."""
        probe = self.probes.get(key)
        if probe is not None:
            return None if probe["host_bound"] else self.model(*inputs, ctx=ctx)
        self._calls[key] = self._calls.get(key, 0) + 1
        if self._calls[key] == 1:
            return self.model(*inputs, ctx=ctx)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.current_stream().synchronize()
        t0 = time.perf_counter()
        start.record()
        out = self.model(*inputs, ctx=ctx)
        end.record()
        host = time.perf_counter() - t0
        end.synchronize()
        span = start.elapsed_time(end) / 1e3
        self.probes[key] = {"host_s": host, "span_s": span, "host_bound": host_bound(host, span)}
        return out

    def report(self) -> dict:
        """What ran, for the run's JSON report."""
        return {"enabled": self.enabled, "adaptive": self.adaptive, "graphs": len(self.graphs),
                "disabled_because": self.disabled_because, "capture_seconds": round(self.capture_seconds, 3),
                "probes": list(self.probes.values())}

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor, ...], ctx: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._warm_up_and_capture(key, inputs, ctx)
        finally:
            self.capture_seconds += time.perf_counter() - t0

    def _warm_up_and_capture(self, key: tuple, inputs: tuple[torch.Tensor, ...], ctx: Any) -> torch.Tensor:
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
