"""The attention plan: which backend each Wan block uses at each denoising step, and at what sparsity.

Built once per request from the config, the model shape and the device; every backend limit is checked here,
never in the hot loop. The plan is pure data: the runtime turns it into per-step attention callables.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from tessera.attention import Backend, dense_backend, get_backend, sparse_backends
from tessera.runtime.config import AttentionConfig, sparsity_schedule


@dataclass(frozen=True, kw_only=True)
class AttentionPlan:
    backend: str  # resolved: a registered backend name ("dense" or a sparse one such as "vsa")
    reason: str  # why `backend` was chosen (reported; matters for attention.backend=auto)
    blocks_per_step: tuple[tuple[str, ...], ...]  # [step][block] -> registered backend name
    sparsity_per_step: tuple[float | None, ...]  # None on steps where no block runs a backend taking a sparsity
    options: tuple[tuple[str, Any], ...] = ()  # `backend`'s own attention.* keys (Backend.config_keys), e.g. SLA's

    @property
    def backends_in_use(self) -> tuple[Backend, ...]:
        """The registered backends some block runs at some step, in first-use order."""
        names = dict.fromkeys(name for blocks in self.blocks_per_step for name in blocks)
        return tuple(get_backend(name) for name in names)

    @property
    def uses_sparse(self) -> bool:
        return any(backend.sparse for backend in self.backends_in_use)

    def options_for(self, backend: Backend) -> dict[str, Any]:
        """The attention.* options `backend` builds its metadata with (none for the exact backend)."""
        return dict(self.options) if backend.name == self.backend else {}

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
    all_dense = len(set(cfg.dense_blocks)) >= num_layers
    backend, reason = _resolve_backend(cfg.backend, grid_thw, head_dim, dtype, device, all_dense)
    dense = dense_backend()
    if backend.sparse and cfg.dense_steps >= num_steps:
        # Not an error (a dense baseline with otherwise identical settings), but never silent.
        backend, reason = dense, (
            f"{reason}, but the whole run is dense because attention.dense_steps={cfg.dense_steps} >= "
            f"num_steps={num_steps}. Fix: set attention.dense_steps below {num_steps} to run any step sparse"
        )
        warnings.warn(reason, stacklevel=2)
    dense_blocks = set(cfg.dense_blocks)
    blocks_per_step, sparsity_per_step = [], []
    for step in range(num_steps):
        sparse_step = backend.sparse and step >= cfg.dense_steps
        blocks = tuple(
            backend.name if sparse_step and block not in dense_blocks else dense.name for block in range(num_layers)
        )
        blocks_per_step.append(blocks)
        takes_sparsity = any(get_backend(b).sparse and get_backend(b).takes_sparsity for b in blocks)
        sparsity_per_step.append(schedule[step] if takes_sparsity else None)
    return AttentionPlan(
        backend=backend.name,
        reason=reason,
        blocks_per_step=tuple(blocks_per_step),
        sparsity_per_step=tuple(sparsity_per_step),
        options=tuple((key, getattr(cfg, key)) for key in backend.config_keys),
    )


def _resolve_backend(
    requested: str,
    grid_thw: tuple[int, int, int],
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    all_dense: bool,
) -> tuple[Backend, str]:
    if requested != "auto":
        backend = get_backend(requested)
        if not backend.sparse:
            return backend, f"attention.backend={requested}"
        problem = backend.check_supported(dtype, head_dim, device, grid_thw)
        if all_dense:
            problem = problem or "attention.dense_blocks lists every block"
        if problem is not None:
            raise ValueError(
                f"attention.backend={requested} cannot run: {problem}. Use attention.backend=dense or auto."
            )
        return backend, f"attention.backend={requested}"
    problems = []
    for backend in sparse_backends():
        problem = backend.check_supported(dtype, head_dim, device, grid_thw)
        if all_dense:
            problem = problem or "attention.dense_blocks lists every block"
        problem = problem or backend.auto_problem(device)
        if problem is None:
            return backend, (
                f"attention.backend=auto chose {backend.name}: sparse blocks configured and supported on this platform"
            )
        problems.append(problem if len(sparse_backends()) == 1 else f"{backend.name}: {problem}")
    dense = dense_backend()
    return dense, f"attention.backend=auto chose {dense.name}: {'; '.join(problems) or 'no sparse backend registered'}"
