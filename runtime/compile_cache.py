"""Warm starts: torch.compile's graphs (inductor's FX graph cache) and Triton's compiled kernels and autotune results
live in `model.cache_dir`, so a second launch with the same shapes skips compilation; the report says hit or miss.

Both caches are process-wide by design (torch and Triton read their directory from the environment when they
compile), so `use_compile_cache` sets it once, when a pipeline loads, before anything compiles.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["compile_cache_counters", "compile_cache_report", "use_compile_cache"]


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
