"""The Wan model family: Wan2.1 T2V/I2V, Wan2.2 A14B (two experts) and TI2V-5B, and FastVideo's distilled FastWan
checkpoints. Config, DiT, fused ops, checkpoint resolution and weight loading, text encoder, VAE, image conditioning,
latent shapes and noise."""

from tessera.models.wan.config import WanConfig, wan_param_dtype
from tessera.models.wan.loading import LoadReport, load_wan_weights_, native_to_diffusers_name
from tessera.models.wan.transformer import (
    WanTransformer,
    build_wan_on_meta,
    materialize_random_,
)

__all__ = [
    "LoadReport",
    "WanConfig",
    "WanTransformer",
    "build_wan_on_meta",
    "load_wan_weights_",
    "materialize_random_",
    "native_to_diffusers_name",
    "wan_param_dtype",
]
