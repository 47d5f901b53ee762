"""The attention-backend registry: each backend (dense, vsa, ...) is one immutable ``Backend`` object.

The runtime asks the registry, never tests backend names: ``get_backend(name)`` for one, ``sparse_backends()`` for
what ``attention.backend=auto`` may pick. Each backend registers itself at the end of its own file (dense.py, vsa.py).
Legend: T, H, W the token grid after patchify (frames, height, width).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tessera.attention.interface import AttentionBackend


@dataclass(frozen=True, kw_only=True)
class Backend:
    """One attention backend, as the runtime needs it.

    check_supported(dtype, head_dim, device, grid_thw) -> why it cannot run, or None (called once per plan).
    auto_problem(device) -> why ``attention.backend=auto`` should not pick it here although it can run, or None.
    build_metadata(grid_thw, sparsity, device) -> its per-request metadata; None for backends without any.
    token_order(metadata) -> (order, inverse) int64 [S] raster index per position and back, or None for any order.
    build(metadata, dtype, head_dim) -> the callable (``AttentionBackend``) over the full sequence.
    """

    name: str
    sparse: bool  # takes attention.sparsity; what attention.backend=auto picks when supported
    uses_gate: bool
    check_supported: Callable[[torch.dtype, int, torch.device, tuple[int, int, int]], str | None]
    auto_problem: Callable[[torch.device], str | None]
    build_metadata: Callable[[tuple[int, int, int], float, torch.device], Any] | None
    token_order: Callable[[Any], tuple[torch.Tensor, torch.Tensor] | None]
    build: Callable[[Any, torch.dtype, int], AttentionBackend]


_BACKENDS: dict[str, Backend] = {}  # registration data, written at import (and by tests); no run-time state


def register_backend(backend: Backend) -> Backend:
    if backend.name in _BACKENDS:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend (tests that register a fake one)."""
    del _BACKENDS[name]


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def sparse_backends() -> tuple[Backend, ...]:
    return tuple(b for b in _BACKENDS.values() if b.sparse)


class MetadataCache:
    """Metadata of every backend, built once per (backend, grid, sparsity, device); one per pipeline, never global."""

    def __init__(self) -> None:
        self._entries: dict[tuple, Any] = {}

    def get(self, backend: Backend, grid_thw: tuple[int, int, int], sparsity: float | None, device) -> Any:
        if backend.build_metadata is None:
            return None
        key = (backend.name, tuple(grid_thw), sparsity, torch.device(device))
        if key not in self._entries:
            self._entries[key] = backend.build_metadata(tuple(grid_thw), sparsity, torch.device(device))
        return self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


def dense_backend() -> Backend:
    """The exact backend that blocks not configured sparse run."""
    return get_backend("dense")
