"""Wan DiT hyper-parameters (``WanConfig``: diffusers' ``WanTransformer3DModel`` config keys) and the dtype policy of
its parameters."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Parameters diffusers keeps in fp32 whatever the model dtype (its `_keep_in_fp32_modules`, matched
# against the dotted name's components). Mirrored so bf16 numerics match a diffusers bf16 load.
_KEEP_IN_FP32 = ("time_embedder", "scale_shift_table", "norm1", "norm2")


def wan_param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """dtype of parameter ``name`` in a model of ``dtype`` (fp32 for diffusers' keep-in-fp32 modules)."""
    return torch.float32 if any(part in _KEEP_IN_FP32 for part in name.split(".")) else dtype


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

# diffusers config keys accepted only at their default (None): Wan2.1 FLF2V (first-last-frame) features.
_UNSUPPORTED_WHEN_SET = ("pos_embed_seq_len",)


@dataclass(frozen=True, kw_only=True)
class WanConfig:
    """Wan2.1 DiT hyper-parameters; field names are diffusers' ``WanTransformer3DModel`` config keys."""

    num_attention_heads: int
    attention_head_dim: int
    ffn_dim: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    gate_compress: bool = False
    sla_proj_l: bool = False  # SLA checkpoints: attn1.proj_l, the linear branch's Linear(D, D) (attention/sla.py)
    # Image-to-video (Wan2.1 I2V): CLIP embedding width, and the width of the image tokens the cross-attention's
    # add_k_proj/add_v_proj read (the image embedder's output: always `dim`). Both None for text-only models.
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None

    def __post_init__(self) -> None:
        patch = tuple(self.patch_size)
        if len(patch) != 3 or not all(isinstance(p, int) and p > 0 for p in patch):
            raise ValueError(
                f"WanConfig.patch_size must be 3 positive ints (t, h, w), got {self.patch_size!r}"
            )
        object.__setattr__(self, "patch_size", patch)
        for name in (
            "num_attention_heads",
            "attention_head_dim",
            "ffn_dim",
            "num_layers",
            "in_channels",
            "out_channels",
            "text_dim",
            "freq_dim",
            "rope_max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        for name in ("cross_attn_norm", "gate_compress", "sla_proj_l"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"WanConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            # RoPE rotates pairs and splits D over (t, h, w): needs an even D with every part non-empty.
            raise ValueError(
                f"WanConfig.attention_head_dim must be even and >= 6 (RoPE pairs over t/h/w), "
                f"got {self.attention_head_dim}"
            )
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even (cos/sin halves), got {self.freq_dim}")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(
                f"WanConfig.qk_norm must be 'rms_norm_across_heads' (Wan2.1), got {self.qk_norm!r}"
            )
        if not (isinstance(self.eps, float) and self.eps > 0):
            raise ValueError(f"WanConfig.eps must be a positive float, got {self.eps!r}")
        self._validate_image_branch()

    def _validate_image_branch(self) -> None:
        for name in ("image_dim", "added_kv_proj_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"WanConfig.{name} must be null or a positive int, got {value!r}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                f"WanConfig.image_dim={self.image_dim} and added_kv_proj_dim={self.added_kv_proj_dim} must be set "
                "together (Wan2.1 I2V: image_dim 1280, added_kv_proj_dim = dim) or both null (text-to-video)"
            )
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.dim:
            raise ValueError(
                f"WanConfig.added_kv_proj_dim={self.added_kv_proj_dim} must equal the model width dim="
                f"{self.dim}: add_k_proj/add_v_proj read the image embedder's output, which has that width"
            )

    @property
    def dim(self) -> int:
        """Model width: ``num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def condition_channels(self) -> int:
        """Input channels beyond the noisy latents: 20 for Wan2.1 I2V (4 mask + 16 first-frame latents), else 0."""
        return self.in_channels - self.out_channels

    @property
    def takes_image(self) -> bool:
        """Whether a request needs an image: CLIP tokens in cross-attention and/or first-frame condition channels."""
        return self.image_dim is not None or self.condition_channels > 0

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim channels rotated by the (t, h, w) positions; diffusers' split (44/42/42 for D=128)."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    def parameter_count(self) -> int:
        """Parameters of the DiT (diffusers layout), from the config alone (the pre-flight memory estimate)."""
        c = self
        dim, ffn = c.dim, c.ffn_dim
        attn = 4 * (dim * dim + dim) + 2 * dim  # q, k, v, out + q/k RMSNorm
        block = 2 * attn + (dim * dim + dim if c.gate_compress else 0) + 2 * dim * ffn + ffn + dim + 2 * dim + 6 * dim
        embed = c.in_channels * math.prod(c.patch_size) * dim + dim
        conditions = (c.freq_dim * dim + dim + dim * dim + dim) + (6 * dim * dim + 6 * dim)
        conditions += c.text_dim * dim + dim + dim * dim + dim
        head = dim * c.out_channels * math.prod(c.patch_size) + c.out_channels * math.prod(c.patch_size) + 2 * dim
        if c.image_dim is not None:  # I2V: image embedder (2 norms, 2 linears) and per block add_k/add_v + norm_added_k
            conditions += 3 * c.image_dim + c.image_dim * c.image_dim + c.image_dim * dim + 3 * dim
            block += 2 * (c.added_kv_proj_dim * dim + dim) + dim
        return c.num_layers * block + embed + conditions + head

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides: Any) -> WanConfig:
        """Build from a diffusers ``config.json`` dict; unknown keys are ignored, FLF2V keys must be unset."""
        for key in _UNSUPPORTED_WHEN_SET:
            if config.get(key) is not None:
                raise ValueError(
                    f"diffusers config key {key!r}={config[key]!r} is a first-last-frame-to-video (FLF2V) feature, "
                    "which Tessera does not implement (the key must be null: Wan2.1 T2V or I2V)"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if kwargs.get("out_channels") is None:  # diffusers: `out_channels or in_channels`
            kwargs["out_channels"] = kwargs.get("in_channels", 16)
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        kwargs.update(overrides)
        return cls(**kwargs)
