"""Failure handling across ranks: phase-tagged errors, the cross-rank config check, the NaN/Inf step check.

`generate` tags any exception with the phase it happened in ("config", "load", "step N", "decode", "write")
as a `RankFailure`; `verify_same_config` compares the resolved config and checkpoint identity over the
group once per request; `first_nonfinite_step_synced` reads the per-step finite flags once, after the loop.
"""

from __future__ import annotations

import hashlib
import json
import signal
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Cancelled",
    "Interrupted",
    "NonFiniteLatentsError",
    "Progress",
    "RankFailure",
    "checkpoint_identity",
    "first_nonfinite_step_synced",
    "is_peer_loss",
    "verify_same_config",
]

# gloo reports a lost peer as a plain RuntimeError; NCCL and the store raise torch.distributed.DistError.
_PEER_LOSS_MARKERS = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")
_MAX_LISTED_KEYS = 5


@dataclass
class Progress:
    """Where `generate` is: a stage name and, while denoising, the step (phase "step N")."""

    stage: str = "config"
    step: int = 0

    @property
    def phase(self) -> str:
        return f"step {self.step}" if self.stage == "step" else self.stage


class RankFailure(RuntimeError):
    """`generate` failed on `rank` during `phase`; the original exception is `cause` (and `__cause__`)."""

    def __init__(self, rank: int, phase: str, cause: BaseException) -> None:
        super().__init__(f"rank {rank} failed during {phase}: {type(cause).__name__}: {cause}")
        self.rank, self.phase, self.cause = rank, phase, cause


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived (launch's handlers raise it); `generate` re-raises it with its rank and phase."""

    def __init__(self, signum: int, rank: int | None = None, phase: str | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.rank, self.phase = signum, rank, phase

    @classmethod
    def at(cls, err: KeyboardInterrupt, rank: int, phase: str) -> Interrupted:
        """`err` (ours or Python's default SIGINT one) tagged with where it arrived."""
        return cls(getattr(err, "signum", signal.SIGINT), rank, phase)


class Cancelled(Exception):
    """Raised by a `generate(on_step=...)` hook to stop the request at the boundary after denoising step `step`
    (0-based): nothing is decoded or written. Under SP every rank must raise it after the same step (the server
    broadcasts rank 0's decision), or the ranks' next collectives no longer match."""

    def __init__(self, step: int, reason: str = "cancelled") -> None:
        super().__init__(f"{reason} after denoising step {step}")
        self.step, self.reason = step, reason


class NonFiniteLatentsError(RuntimeError):
    """Latents became NaN/Inf; raised on every rank with the same first bad step."""

    def __init__(self, step: int, ranks: list[int]) -> None:
        super().__init__(
            f"latents are NaN/Inf after denoising step {step} (first seen on rank(s) {ranks}); nothing was "
            "decoded or written. Check the checkpoint for bad weights, or try model.dtype=float32."
        )
        self.step, self.ranks = step, ranks


def is_peer_loss(err: BaseException) -> bool:
    """True when `err` is a collective failing because another rank died, left or stopped answering."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _PEER_LOSS_MARKERS)


def checkpoint_identity(path: str | None) -> dict[str, str]:
    """file -> "size:sha256(safetensors header)" (other files: size:sha256(content)) under `path`.

    Reads headers only, so it is cheap for multi-GB checkpoints, and independent of mtimes (which differ
    between nodes holding copies of the same files).
    """
    if path is None:
        return {}
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    identity = {}
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            if file.suffix == ".safetensors" and size >= 8:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                data = handle.read(min(header_len, 100 << 20))
            else:
                data = handle.read(1 << 20) if size <= (1 << 20) else b""
        identity[str(file.relative_to(root)) if file != root else file.name] = (
            f"{size}:{hashlib.sha256(data).hexdigest()[:16]}"
        )
    return identity


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}{key}.", sub, out)
    else:
        out[prefix.rstrip(".")] = json.dumps(value, default=str, sort_keys=True)


def verify_same_config(cfg: Any, model_cfg: Any, group: dist.ProcessGroup | None = None) -> None:
    """Check that every rank resolved the same config, architecture and checkpoint (one all_gather_object).

    Raises ValueError on every rank naming the ranks and keys that differ from rank 0. No-op on one rank.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    values: dict[str, str] = {}
    _flatten("", asdict(cfg), values)
    _flatten("arch.", asdict(model_cfg), values)
    _flatten("checkpoint.", checkpoint_identity(cfg.model.path), values)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (digest, values), group=group)
    ref_digest, ref_values = gathered[0]
    problems = []
    for rank, (rank_digest, rank_values) in enumerate(gathered):
        if rank_digest == ref_digest:
            continue
        keys = sorted(k for k in ref_values.keys() | rank_values.keys() if ref_values.get(k) != rank_values.get(k))
        shown = ", ".join(f"{k}={rank_values.get(k, '<missing>')} (rank 0: {ref_values.get(k, '<missing>')})"
                          for k in keys[:_MAX_LISTED_KEYS])
        more = f" and {len(keys) - _MAX_LISTED_KEYS} more" if len(keys) > _MAX_LISTED_KEYS else ""
        problems.append(f"rank {rank}: {shown}{more}")
    if problems:
        raise ValueError(
            "ranks resolved different configs: " + "; ".join(problems) + ". Launch every rank with the same "
            "arguments and the same checkpoint files."
        )


def first_nonfinite_step_synced(
    finite_steps: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[int, list[int]] | None:
    """(first step whose latents were not finite on some rank, those ranks), or None if all were finite.

    `finite_steps`: [num_steps] bool, filled on the device during the loop. One all_gather over `group`
    (also a barrier: nobody decodes or writes before every rank finished denoising) and one host sync.
    """
    flags = finite_steps.to(torch.int32)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered = [torch.empty_like(flags) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, flags, group=group)
        flags = torch.stack(gathered)
    else:
        flags = flags.unsqueeze(0)
    flags_RS = flags.cpu()
    bad_steps = (flags_RS == 0).any(dim=0).nonzero()
    if bad_steps.numel() == 0:
        return None
    step = int(bad_steps[0, 0])
    return step, [int(r) for r in (flags_RS[:, step] == 0).nonzero()[:, 0]]
