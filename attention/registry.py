"""The attention-backend registry: each backend (dense, vsa, ...) is one immutable ``Backend`` object.

The runtime asks the registry, never tests backend names: ``get_backend(name)`` for one, ``sparse_backends()`` for
what ``attention.backend=auto`` may pick. Each backend registers itself at the end of its own file (dense.py, vsa.py,
sla.py).
Legend: T, H, W the token grid after patchify (frames, height, width).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tessera.attention.interface import AttentionBackend


@dataclass(frozen=True, kw_only=True)
class Backend:
    """One attention backend, as the runtime needs it.

    check_supported(dtype, head_dim, device, grid_thw) -> why it cannot run, or None (called once per plan).
    auto_problem(device) -> why ``attention.backend=auto`` should not pick it here although it can run, or None.
    build_metadata(grid_thw, sparsity, device, **options) -> its per-request metadata; None for backends without any.
        ``options`` are the attention-config fields named in ``config_keys`` (e.g. SLA's ``sla_topk``), as keywords.
    token_order(metadata) -> (order, inverse) int64 [S] raster index per position and back, or None for any order;
        on the host or the device (a host table is copied in where it is used, see ``ForwardContext``).
    build(metadata, dtype, head_dim) -> the callable (``AttentionBackend``) over the full sequence.
    bind_layer(attn, attention_module) -> a copy of ``attn`` bound to one transformer block's own weights (SLA's
        ``proj_l``), or None (the default) when every block shares the one callable.
    layer_weight: the attribute of a block's self-attention module that holds those weights (``"proj_l"``), None when
        there are none; the runtime reports a checkpoint without them (the backend then runs with zeros).
    reference_bytes(batch, heads, tokens, head_dim, **options) -> the bytes its PyTorch reference (the CPU path) holds
        at its peak beyond q, k, v, for the memory pre-flight; None: no more than dense SDPA's.
    """

    name: str
    sparse: bool  # a sparse backend: what attention.backend=auto may pick when supported
    uses_gate: bool
    check_supported: Callable[[torch.dtype, int, torch.device, tuple[int, int, int]], str | None]
    auto_problem: Callable[[torch.device], str | None]
    build_metadata: Callable[..., Any] | None  # (grid_thw, sparsity | None, device, **options)
    token_order: Callable[[Any], tuple[torch.Tensor, torch.Tensor] | None]
    build: Callable[[Any, torch.dtype, int], AttentionBackend]
    config_keys: tuple[str, ...] = ()  # attention-config fields passed to build_metadata as keyword arguments
    takes_sparsity: bool = True  # False: attention.sparsity does not apply (build_metadata then gets None)
    bind_layer: Callable[[AttentionBackend, Any], AttentionBackend] | None = None
    layer_weight: str | None = None
    reference_bytes: Callable[..., int] | None = None


def triton_kernel_problem(
    label: str, dtype: torch.dtype, head_dim: int, device: torch.device | str, *,
    dtypes: tuple[torch.dtype, ...], head_dims: tuple[int, ...],
) -> str | None:
    """Why a backend whose CUDA path is a Triton kernel (and whose CPU path is its PyTorch reference) cannot run with
    these settings, or None; `label` ("VSA", "SLA") starts each message. The reference takes any positive head dim,
    the kernel only `head_dims`."""
    device = torch.device(device)
    if dtype not in dtypes:
        return f"{label} supports float16, bfloat16 and float32, not {dtype}"
    if head_dim < 1:
        return f"{label} needs a positive head dim, got {head_dim}"
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return f"{label} on CUDA needs the Triton kernel, but triton is not installed"
        if head_dim not in head_dims:
            return f"the {label} Triton kernel supports head dims {'/'.join(map(str, head_dims))}, got {head_dim}"
    elif device.type != "cpu":
        return f"{label} runs on cuda (Triton) or cpu (reference), not {device.type}"
    return None


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
    """Metadata of every backend, built once per (backend, grid, sparsity, options, device); one per pipeline, never
    global."""

    def __init__(self) -> None:
        self._entries: dict[tuple, Any] = {}

    def get(
        self,
        backend: Backend,
        grid_thw: tuple[int, int, int],
        sparsity: float | None,
        device,
        options: Mapping[str, Any] | None = None,
    ) -> Any:
        """The backend's metadata; ``options`` (the attention-config values of ``backend.config_keys``) are passed to
        ``build_metadata`` as keywords. A backend with ``takes_sparsity=False`` gets (and is cached under) None."""
        if backend.build_metadata is None:
            return None
        options = dict(options or {})
        unknown = sorted(set(options) - set(backend.config_keys))
        if unknown:  # a caller bug, not a user error: the runtime passes exactly the backend's config_keys
            raise TypeError(f"backend {backend.name!r} takes the options {backend.config_keys}, not {unknown}")
        sparsity = sparsity if backend.takes_sparsity else None
        key = (backend.name, tuple(grid_thw), sparsity, tuple(sorted(options.items())), torch.device(device))
        if key not in self._entries:
            self._entries[key] = backend.build_metadata(tuple(grid_thw), sparsity, torch.device(device), **options)
        return self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


def dense_backend() -> Backend:
    """The exact backend that blocks not configured sparse run."""
    return get_backend("dense")
