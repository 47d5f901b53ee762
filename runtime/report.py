"""What the JSON report records beyond the request: where it came from and what every rank measured.

`collect_provenance` (versions, git commit, device, host, start time) runs once per request;
`gather_rank_stats` collects every rank's step seconds and peak memory once, after the denoising loop;
`request_report` is the request's own part (config, model, mesh, attention plan, kernels).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tessera.parallel import ParallelMesh
from tessera.runtime.config import GenerateConfig
from tessera.runtime.plan import AttentionPlan
from tessera.runtime.request import RequestState

__all__ = ["collect_provenance", "gather_rank_stats", "peak_memory", "request_report", "reset_peak_memory"]

_SOURCE_DIR = Path(__file__).resolve().parents[1]  # the repository root of an editable or source install
_GIT_TIMEOUT_S = 2.0  # a report must never wait on a slow file system or a hung git


def collect_provenance(device: torch.device) -> dict[str, Any]:
    """Package, git, library and CUDA versions, this rank's device name and host, and the time (UTC, ISO 8601).

    `git_commit` is the 40-hex HEAD and `dirty` whether tracked files differ from it, both None when the source
    is not a git checkout of its own (an installed wheel) or git is missing; `triton` is None when not installed.
    """
    commit, dirty = _git_state(_SOURCE_DIR)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "cpu"
    return {
        "tessera": _version("tessera"),
        "git_commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "cuda": torch.version.cuda,
        "device_name": device_name,
        "hostname": socket.gethostname(),
        "timestamp": datetime.now(timezone.utc).isoformat(),
    }


def gather_rank_stats(stats: dict[str, Any], mesh: ParallelMesh) -> list[dict[str, Any]]:
    """Every rank's `stats`, indexed by rank: one `all_gather_object` over the world (none on one rank).

    A collective: every rank of the world must call it, at the same point of the request.
    """
    if mesh.world_size == 1:
        return [stats]
    gathered: list[Any] = [None] * mesh.world_size
    dist.all_gather_object(gathered, stats)
    return gathered


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state(directory: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the checkout rooted at `directory`; (None, None) when there is none."""
    directory = directory.resolve()
    try:
        top, commit = _git(directory, "rev-parse", "--show-toplevel", "HEAD").splitlines()
    except (OSError, subprocess.SubprocessError, ValueError):  # no git, not a checkout, timeout
        return None, None
    if Path(top).resolve() != directory:  # an installed copy inside some other repository: not our commit
        return None, None
    try:
        dirty = bool(_git(directory, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit, dirty


def _git(directory: Path, *args: str) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock under someone else's running git.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True,
                          timeout=_GIT_TIMEOUT_S, env=env)
    return done.stdout.strip()


def request_report(
    cfg: GenerateConfig, family, model_cfg, mesh: ParallelMesh, plan: AttentionPlan, state: RequestState,
    load_info: dict,
) -> dict:
    """The request's part of the JSON report; the loop's measurements are added by the caller."""
    return {
        "config": asdict(cfg),
        "family": family.name,
        "architecture": family.arch(model_cfg),
        "world_size": mesh.world_size,
        "sp": mesh.sp_size,
        "cfg": mesh.cfg_size,
        "device": str(mesh.device),
        "weights": load_info,
        "token_grid": list(state.grid_thw),
        "num_tokens": state.seq_plan.seq_len,
        "attention": {
            "backend": plan.backend,
            "reason": plan.reason,
            "backend_per_block": [list(blocks) for blocks in plan.blocks_per_step],
            "sparsity_per_step": list(plan.sparsity_per_step),
            **({"options": dict(plan.options)} if plan.options else {}),
            "kernels": dict(state.kernels),
        },
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement on `device` (CUDA; the process maximum elsewhere cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: CUDA's allocated maximum, or the process's maximum resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
