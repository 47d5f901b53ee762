"""Wan2.1 DiT (diffusers layout and numerics) and its safetensors weight loading."""

from tessera.models.loading import LoadReport, load_wan_weights_, native_to_diffusers_name
from tessera.models.wan import (
    SelfAttention,
    WanConfig,
    WanForwardContext,
    WanTransformer,
    build_wan_on_meta,
    materialize_random_,
    wan_param_dtype,
)

__all__ = [
    "LoadReport",
    "SelfAttention",
    "WanConfig",
    "WanForwardContext",
    "WanTransformer",
    "build_wan_on_meta",
    "load_wan_weights_",
    "materialize_random_",
    "native_to_diffusers_name",
    "wan_param_dtype",
]
