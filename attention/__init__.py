"""Attention backends for Tessera: the backend protocol, dense SDPA and Video Sparse Attention.

The Triton fine-stage kernel (``attention.vsa_triton``) is imported lazily by ``VSAAttention``.
"""

from tessera.attention.dense import DenseAttention
from tessera.attention.interface import AttentionBackend
from tessera.attention.vsa import (
    VSAAttention,
    VSAMetadata,
    VSAMetadataCache,
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
    "DenseAttention",
    "VSAAttention",
    "VSAMetadata",
    "VSAMetadataCache",
    "build_vsa_metadata",
    "select_from_tile_means",
    "tile",
    "untile",
    "vsa_attention_reference",
    "vsa_check_supported",
    "vsa_select_blocks",
    "vsa_topk",
]
