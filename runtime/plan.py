"""The attention plan: which backend each Wan block uses at each denoising step, and at what sparsity.

Built once per request from the config, the model shape and the device; every backend limit is checked here,
never in the hot loop. The plan is pure data: the runtime turns it into per-step attention callables.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tessera.attention import vsa_check_supported
from tessera.runtime.config import AttentionConfig, sparsity_schedule

VSA_TILE = (4, 4, 4)


@dataclass(frozen=True, kw_only=True)
class AttentionPlan:
    backend: str  # resolved: "dense" or "vsa"
    reason: str  # why `backend` was chosen (reported; matters for attention.backend=auto)
    blocks_per_step: tuple[tuple[str, ...], ...]  # [step][block] -> "dense" | "vsa"
    sparsity_per_step: tuple[float | None, ...]  # None on steps where no block runs VSA

    @property
    def uses_vsa(self) -> bool:
        return any("vsa" in blocks for blocks in self.blocks_per_step)

    def step_key(self, step: int) -> tuple[tuple[str, ...], float | None]:
        """Steps with equal keys share their attention callables and forward context."""
        return self.blocks_per_step[step], self.sparsity_per_step[step]


def build_attention_plan(
    cfg: AttentionConfig,
    *,
    num_layers: int,
    num_steps: int,
    grid_thw: tuple[int, int, int],
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> AttentionPlan:
    """Resolve `attention.*` into a per-step, per-block plan; ValueError naming the key on bad input."""
    for block in cfg.dense_blocks:
        if not 0 <= block < num_layers:
            raise ValueError(
                f"attention.dense_blocks contains {block}, but the model has {num_layers} blocks "
                f"(valid: 0..{num_layers - 1})."
            )
    schedule = sparsity_schedule(cfg.sparsity, num_steps)
    backend, reason = _resolve_backend(cfg.backend, grid_thw, head_dim, dtype, device, num_layers, cfg.dense_blocks)
    if backend == "vsa" and cfg.dense_steps >= num_steps:
        # Not an error (a dense baseline with otherwise identical settings), but never silent.
        backend, reason = "dense", (
            f"{reason}, but the whole run is dense because attention.dense_steps={cfg.dense_steps} >= "
            f"num_steps={num_steps}. Fix: set attention.dense_steps below {num_steps} to run any step sparse"
        )
        warnings.warn(reason, stacklevel=2)
    dense_blocks = set(cfg.dense_blocks)
    blocks_per_step, sparsity_per_step = [], []
    for step in range(num_steps):
        sparse_step = backend == "vsa" and step >= cfg.dense_steps
        blocks = tuple(
            "vsa" if sparse_step and block not in dense_blocks else "dense" for block in range(num_layers)
        )
        blocks_per_step.append(blocks)
        sparsity_per_step.append(schedule[step] if "vsa" in blocks else None)
    return AttentionPlan(
        backend=backend,
        reason=reason,
        blocks_per_step=tuple(blocks_per_step),
        sparsity_per_step=tuple(sparsity_per_step),
    )


def _resolve_backend(
    requested: str,
    grid_thw: tuple[int, int, int],
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    num_layers: int,
    dense_blocks: list[int],
) -> tuple[str, str]:
    if requested == "dense":
        return "dense", "attention.backend=dense"
    problem = _vsa_problem(grid_thw, head_dim, dtype, device)
    if len(set(dense_blocks)) >= num_layers:
        problem = problem or "attention.dense_blocks lists every block"
    if requested == "vsa":
        if problem is not None:
            raise ValueError(f"attention.backend=vsa cannot run: {problem}. Use attention.backend=dense or auto.")
        return "vsa", "attention.backend=vsa"
    if problem is None and device.type != "cuda":
        # On CPU VSA runs its plain-PyTorch reference, which materialises [B, N, S, S] scores: fine for tests
        # and small grids (attention.backend=vsa forces it), not a sensible automatic choice.
        problem = "VSA's Triton kernel needs a CUDA GPU (attention.backend=vsa runs the O(S^2) CPU reference)"
    if problem is not None:
        return "dense", f"attention.backend=auto chose dense: {problem}"
    return "vsa", "attention.backend=auto chose vsa: sparse blocks configured and supported on this platform"


def _vsa_problem(grid_thw: tuple[int, int, int], head_dim: int, dtype: torch.dtype, device: torch.device) -> str | None:
    if any(g < t for g, t in zip(grid_thw, VSA_TILE, strict=True)):
        return (
            f"the token grid {grid_thw} (frames, height, width after patchify) is smaller than one VSA tile "
            f"{VSA_TILE}; raise num_frames/height/width (>= 13 frames, >= 64 px)"
        )
    return vsa_check_supported(dtype, head_dim, device)
