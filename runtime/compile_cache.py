"""Warm starts: torch.compile's graphs (inductor's FX graph cache) and Triton's compiled kernels and autotune results
live in `model.cache_dir`, so a second launch with the same shapes skips compilation; the report says hit or miss.

Both caches are process-wide by design (torch and Triton read their directory from the environment when they
compile), so `use_compile_cache` sets it once, when a pipeline loads, before anything compiles.

Even with every kernel cached, a process pays once for things no cache keeps: Triton hashes its own compiler and
its ~hundreds-of-MB libtriton library to key its cache (0.3-0.9 s on the device's hosts), loads its CUDA driver
module, and cuDNN and cuBLAS load their libraries and create handles on first use. `DeviceWarmup` does all of it
in a background thread while the weights load, so the first denoising step no longer waits for it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

__all__ = ["DeviceWarmup", "compile_cache_counters", "compile_cache_report", "use_compile_cache"]


def use_compile_cache(cache_dir: str | None) -> Path | None:
    """Point inductor (`TORCHINDUCTOR_CACHE_DIR`) and Triton (`TRITON_CACHE_DIR`) at `cache_dir` (created; `~`
    expanded); None leaves torch's defaults. Returns the directory used."""
    if cache_dir is None:
        return None
    root = Path(cache_dir).expanduser()
    (root / "inductor").mkdir(parents=True, exist_ok=True)
    (root / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    return root


def compile_cache_counters() -> dict[str, float]:
    """Inductor's FX graph cache hits and misses so far in this process, and the seconds torch.compile has spent
    (dynamo's `_compile.compile_inner`: tracing, guards, then compiling or loading the cached code)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    inductor = counters["inductor"]
    return {"hits": int(inductor["fxgraph_cache_hit"]), "misses": int(inductor["fxgraph_cache_miss"]),
            "seconds": float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))}


def compile_cache_report(root: Path | None, before: dict[str, float]) -> dict:
    """The report's `compile_cache`: the directory, this request's graph hits and misses, the seconds it spent in
    torch.compile, and a verdict: "hit" (everything it compiled came from the cache), "miss", "partial", or "none"
    (nothing compiled: CPU, or warm)."""
    now = compile_cache_counters()
    hits, misses = now["hits"] - before["hits"], now["misses"] - before["misses"]
    status = "none" if hits + misses == 0 else "hit" if misses == 0 else "miss" if hits == 0 else "partial"
    return {"dir": None if root is None else str(root), "graph_hits": hits, "graph_misses": misses,
            "compile_seconds": round(now["seconds"] - before["seconds"], 3), "status": status}


class DeviceWarmup:
    """Per-process start-up work of the kernels' libraries, in a daemon thread: `start()` it before the weights
    load, `join()` before the first step. Best effort: a failure is recorded (`error`), never raised, and the
    work is then simply done on first use as before. `seconds`: how long the thread worked."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.seconds: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="tessera-device-warmup", daemon=True)

    def start(self) -> DeviceWarmup:
        self._thread.start()
        return self

    def join(self) -> dict:
        """Wait for the thread; the report's entry."""
        self._thread.join()
        return {"seconds": None if self.seconds is None else round(self.seconds, 3), "error": self.error}

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._triton()
            if self.device.type == "cuda":
                self._cuda_libraries()
        except Exception as exc:  # noqa: BLE001 - best effort: the same work happens on first use anyway
            self.error = f"{type(exc).__name__}: {exc}"
        self.seconds = time.perf_counter() - t0

    def _triton(self) -> None:
        try:
            from triton.runtime.cache import triton_key
        except ImportError:  # no Triton, or one that keys its cache elsewhere
            return
        triton_key()  # lru_cached: every kernel's first launch in this process reuses it
        if self.device.type == "cuda":
            from triton.runtime import driver

            driver.active.get_current_device()  # loads (or, cold, builds) Triton's CUDA utility module

    def _cuda_libraries(self) -> None:
        """Tiny calls of what the DiT calls: cuBLAS(Lt) GEMMs, cuDNN's attention and 3-D convolution."""
        with torch.inference_mode(), torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                dtype = self.dtype if self.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
                x, w = (torch.randn(*shape, device=self.device, dtype=dtype) for shape in ((64, 128), (128, 64)))
                bias = torch.zeros(64, device=self.device, dtype=dtype)
                torch.addmm(bias, x, w)
                torch._addmm_activation(bias, x, w, use_gelu=True)  # the FFN's cuBLASLt epilogue
                q = torch.randn(1, 2, 64, 128, device=self.device, dtype=dtype)
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
                video = torch.randn(1, 4, 1, 4, 4, device=self.device, dtype=dtype)
                kernel = torch.randn(8, 4, 1, 2, 2, device=self.device, dtype=dtype)
                torch.nn.functional.conv3d(video, kernel, stride=(1, 2, 2))  # the patch embedding's
            stream.synchronize()
