"""CUDA-event timing shared by the bench scripts (run as `python bench/<script>.py`, so this dir is on sys.path)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median milliseconds of ``iters`` calls of ``fn`` (CUDA events, synced per call) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
