"""Attention backends for Tessera: the backend protocol, the backend registry, dense SDPA, Video Sparse Attention and
Sparse-Linear Attention.

Importing this package registers every backend (each at the end of its own file).

The Triton kernels (``attention.vsa_triton``, ``attention.sla_triton``) are imported lazily by ``VSAAttention`` and
``SLAAttention``.
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

# isort: split
# Registration order is attention.backend=auto's preference: VSA before SLA.
from tessera.attention.sla import (
    SLAAttention,
    SLAMetadata,
    build_sla_metadata,
    sla_attention_reference,
    sla_check_supported,
    sla_num_selected,
    sla_select_blocks,
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
    "SLAAttention",
    "SLAMetadata",
    "build_sla_metadata",
    "sla_attention_reference",
    "sla_check_supported",
    "sla_num_selected",
    "sla_select_blocks",
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
