"""Attention backends for Tessera: the backend protocol, the backend registry, dense SDPA and Video Sparse Attention.

Importing this package registers every backend (each at the end of its own file).

The Triton fine-stage kernel (``attention.vsa_triton``) is imported lazily by ``VSAAttention``.
"""

from tessera.attention.dense import DenseAttention
from tessera.attention.interface import AttentionBackend
from tessera.attention.registry import (
    Backend,
    MetadataCache,
    backend_names,
    dense_backend,
    get_backend,
    register_backend,
    sparse_backends,
    unregister_backend,
)
from tessera.attention.vsa import (
    VSAAttention,
    VSAMetadata,
    build_vsa_metadata,
    select_from_tile_means,
    tile,
    untile,
    vsa_attention_reference,
    vsa_check_supported,
    vsa_select_blocks,
    vsa_topk,
)

__all__ = [
    "AttentionBackend",
    "Backend",
    "MetadataCache",
    "backend_names",
    "dense_backend",
    "get_backend",
    "register_backend",
    "sparse_backends",
    "unregister_backend",
    "DenseAttention",
    "VSAAttention",
    "VSAMetadata",
    "build_vsa_metadata",
    "select_from_tile_means",
    "tile",
    "untile",
    "vsa_attention_reference",
    "vsa_check_supported",
    "vsa_select_blocks",
    "vsa_topk",
]
