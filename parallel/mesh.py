"""The (cfg x sp) device mesh: process-group set-up, one mesh object built once and passed around.

``launch`` calls ``init_process_group_from_env`` (torchrun env vars; world 1 needs none) and
``destroy_process_group_safely`` in ``finally``; ``runtime`` calls ``build_mesh`` and
``warmup_collectives`` once before the first denoising step. Nothing here is module-level state.

Rank layout: ``rank = cfg_rank * sp + sp_rank``, so SP groups are contiguous rank ranges (on one host
they share the fastest links) and CFG groups stride by ``sp``. Groups are built with plain
``dist.new_group`` rather than ``init_device_mesh``: it is explicit, works identically on gloo/CPU and
NCCL/CUDA, and lets an axis that spans the whole world reuse the default group (no extra communicator).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "ParallelMesh",
    "build_mesh",
    "destroy_process_group_safely",
    "init_process_group_from_env",
    "warmup_collectives",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelMesh:
    """Parallel degrees and process groups of this rank. Groups are ``None`` when that axis has size 1."""

    world_size: int
    rank: int
    local_rank: int
    cfg_size: int
    cfg_rank: int
    sp_size: int
    sp_rank: int
    sp_group: dist.ProcessGroup | None
    cfg_group: dist.ProcessGroup | None
    device: torch.device
    # The ranks of this machine (torchrun numbers them contiguously per node): the text encoder runs once per
    # node, on local rank 0, and its embeddings are broadcast over `node_group` (None for a one-rank node).
    local_world_size: int = 1
    node_group: dist.ProcessGroup | None = None

    @property
    def node_leader(self) -> int:
        """Global rank of this node's first rank (its local rank 0)."""
        return self.rank - self.rank % self.local_world_size

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: the one that prints, writes outputs and reports."""
        return self.rank == 0


def _world_of_initialised_pg() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def build_mesh(cfg: int, sp: int, device: torch.device, *, local_rank: int | None = None) -> ParallelMesh:
    """Build the ``(cfg, sp)`` mesh over the initialised default process group (or world 1 without one).

    Every rank must call this with the same arguments: each rank calls ``new_group`` for every group,
    in the same order, as ``torch.distributed`` requires. ``local_rank`` defaults to ``LOCAL_RANK``
    from the environment (0 when unset).
    """
    for key, value in (("parallel.cfg", cfg), ("parallel.sp", sp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    world_size, rank = _world_of_initialised_pg()
    if cfg * sp != world_size:
        fix = (
            f"set parallel.sp={world_size // cfg}"
            if world_size % cfg == 0
            else f"set parallel.cfg=1 and parallel.sp={world_size}"
        )
        raise ValueError(
            f"parallel.cfg * parallel.sp must equal the world size: parallel.cfg={cfg} * parallel.sp={sp} "
            f"= {cfg * sp}, but the world size is {world_size}. Fix: {fix}, "
            f"or launch with torchrun --nproc_per_node={cfg * sp}."
        )
    cfg_rank, sp_rank = divmod(rank, sp)

    # Rank = cfg_rank * sp + sp_rank; an SP group holds one cfg slice, a CFG group one sp position.
    sp_group = _axis_group([[c * sp + s for s in range(sp)] for c in range(cfg)], cfg_rank, world_size)
    cfg_group = _axis_group([[c * sp + s for c in range(cfg)] for s in range(sp)], sp_rank, world_size)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local_world < 1 or world_size % local_world:
        local_world = world_size  # not torchrun's layout: treat the job as one node
    nodes = [[n * local_world + i for i in range(local_world)] for n in range(world_size // local_world)]
    node_group = _axis_group(nodes, rank // local_world, world_size)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world))
    return ParallelMesh(
        world_size=world_size,
        rank=rank,
        local_rank=local_rank,
        cfg_size=cfg,
        cfg_rank=cfg_rank,
        sp_size=sp,
        sp_rank=sp_rank,
        sp_group=sp_group,
        cfg_group=cfg_group,
        device=torch.device(device),
        local_world_size=local_world,
        node_group=node_group,
    )


def _axis_group(rank_lists: list[list[int]], mine: int, world_size: int) -> dist.ProcessGroup | None:
    """Create every group of one mesh axis (all ranks, same order, as new_group requires); return this rank's.

    None for an axis of size 1; the default group when the axis spans the whole world.
    """
    size = len(rank_lists[0])
    if world_size == 1 or size == 1:
        return None
    if size == world_size:
        return dist.group.WORLD
    return [dist.new_group(ranks=ranks) for ranks in rank_lists][mine]


def init_process_group_from_env(
    timeout_s: float, *, device_type: str | None = None, share_one_gpu: bool = False
) -> tuple[int, int, int, torch.device]:
    """Initialise the default process group from torchrun's env vars -> ``(rank, world, local_rank, device)``.

    NCCL on CUDA (device ``cuda:LOCAL_RANK``, made current), gloo on CPU. ``device_type`` forces
    ``"cuda"`` or ``"cpu"`` (default: CUDA when available). Without the env vars (a plain ``python``
    run), or with ``WORLD_SIZE=1``, no process group is created and world 1 is returned; the CUDA device is
    made current in every case (the allocator's per-device calls need it). ``timeout_s`` bounds every
    collective: a rank that dies makes the others fail instead of hang. ``share_one_gpu`` (tests only: one GPU
    at hand) puts every rank on ``cuda:0`` with gloo, which stages CUDA tensors through the host; NCCL
    refuses two ranks on one device.
    """
    if timeout_s <= 0:
        raise ValueError(f"parallel.timeout_s must be > 0 seconds, got {timeout_s}")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_type='cuda' but CUDA is not available; use device_type='cpu'")

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0, _current_device(device_type, 0)
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # never assumed equal to RANK (several nodes)
    device = _current_device(device_type, 0 if share_one_gpu else local_rank)
    if world_size == 1:
        return rank, world_size, local_rank, device
    if missing:
        raise ValueError(
            f"torchrun environment incomplete: missing {', '.join(missing)}. "
            "Fix: launch with torchrun (which sets them) or export all of " + ", ".join(_TORCHRUN_VARS)
        )
    if dist.is_initialized():
        raise RuntimeError("init_process_group_from_env: a default process group is already initialised")
    backend = "nccl" if device_type == "cuda" and not share_one_gpu else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    return rank, world_size, local_rank, device


def _current_device(device_type: str, index: int) -> torch.device:
    """The rank's device; a CUDA device is made current (torch.cuda calls without an index use it)."""
    if device_type != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def warmup_collectives(mesh: ParallelMesh) -> None:
    """Run one tiny collective on every group of the mesh so lazy communicator set-up is not timed.

    An ``all_to_all_single`` on the SP group (the Ulysses collective), an ``all_reduce`` on the CFG
    group and one on the world. Blocks until done (it synchronises the device).
    """
    if mesh.world_size == 1:
        return
    if mesh.sp_size > 1:
        send = torch.arange(mesh.sp_size, dtype=torch.float32, device=mesh.device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=mesh.sp_group)
    if mesh.cfg_size > 1:
        dist.all_reduce(torch.ones(1, device=mesh.device), group=mesh.cfg_group)
    dist.all_reduce(torch.ones(1, device=mesh.device))
    if mesh.device.type == "cuda":
        torch.cuda.synchronize(mesh.device)


def destroy_process_group_safely() -> None:
    """Destroy the default process group if one exists; never raises (for ``finally`` blocks).

    Collects garbage first: a subgroup kept alive only by a reference cycle (an exception's traceback, a
    closure) and freed after the destroy makes gloo abort the process at exit ("terminate called without an
    active exception"), and torchrun then kills the other ranks, possibly while rank 0 writes the video.
    """
    try:
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown must not mask the original error
        pass
