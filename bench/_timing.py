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


def graph_replay_ms(fn: Callable[[], object], replays: int = 20) -> float:
    """GPU milliseconds of one ``fn()`` as a CUDA-graph replay (median of 5 runs of ``replays`` replays; warmed on a
    side stream, as capture wants). ``attention.py``'s ``graph_ms`` times one replay per event and turns a failed
    capture into a missing row instead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[2]
