"""Run a function on N real gloo ranks (spawned processes) and collect each rank's result.

``run_multirank(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo process
group in each through ``parallel.init_process_group_from_env`` (torchrun-style env vars, free TCP port),
calls ``fn(rank, world_size, *args)`` and returns the results in rank order. Any rank's exception is
re-raised here as ``MultirankError`` with the tracebacks of all failed ranks, the earliest failure first
(the root cause; later ones are usually peers losing their connection). A job that runs past
``timeout_s`` is killed and fails the test.
``fn`` must be a module-level (picklable) function.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


class MultirankError(RuntimeError):
    """One or more ranks of a multirank job failed; the message holds their tracebacks."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    from tessera.parallel import destroy_process_group_safely, init_process_group_from_env

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # N ranks share the CI's 2 cores
    try:
        init_process_group_from_env(timeout_s=30.0, device_type="cpu")
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        # time.time_ns() orders failures across processes, so the report can lead with the root cause.
        (Path(out_dir) / f"rank{rank}.err").write_text(f"{time.time_ns()}\n{traceback.format_exc()}")
        raise
    finally:
        destroy_process_group_safely()


def run_multirank(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker,
            args=(world_size, _free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            # join() raises as soon as one rank fails and terminates the others.
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    _kill(context.processes)
                    raise MultirankError(
                        f"multirank job {fn.__name__} (world {world_size}) ran past {timeout_s} s"
                        + _failure_report(out_dir)
                    )
        except ProcessException as exc:
            _kill(context.processes)
            raise MultirankError(
                f"multirank job {fn.__name__} (world {world_size}) failed" + _failure_report(out_dir)
            ) from exc
        out = Path(out_dir)
        return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _kill(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(5)


def _failure_report(out_dir: str) -> str:
    reports = []
    for path in Path(out_dir).glob("rank*.err"):
        stamp, _, trace = path.read_text().partition("\n")
        reports.append((int(stamp), path.stem, trace))
    return "".join(f"\n\n--- {name} ---\n{trace}" for _, name, trace in sorted(reports))
