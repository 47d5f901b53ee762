"""What the runtime asks a model family for, and the registry of families.

A family (`models/wan/`, ...) is one `ModelFamily` object: it resolves a checkpoint into one typed object, states the
architecture config, builds and loads the DiT, and makes the conditioning (text encoder, latent decoder, image
encoders). The runtime never imports a family's modules: it asks `family_for(...)` and calls the object. A new
family is its own package plus one line in `models/__init__.py`.

Shared vocabulary (no family's names): `LatentFormat` (a VAE's latent space), `latent_shape`/`token_grid`, the
`TextEncoder`/`LatentDecoder` interfaces, `ForwardContext` (what the runtime injects into a DiT per request) and the
`DiT` protocol (what the runtime reads from one).
Shape legend: B batch, L text tokens, C channels, F latent frames, H/W latent height/width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_LATENTS", "TEXT_ONLY", "DiT", "ForwardContext", "ImageCondition", "LatentDecoder", "LatentFormat",
    "ModelFamily",
    "SelfAttention", "TextEncoder", "family_for", "family_names", "get_family", "latent_shape", "preset_names",
    "random_weight_presets", "register_family", "token_grid", "unregister_family",
]


@dataclass(frozen=True)
class LatentFormat:
    """A VAE's latent space: channels and compression (pixels per latent cell), from its config.json (`z_dim`,
    `scale_factor_spatial`, `scale_factor_temporal`). The first frame is encoded alone, then `temporal_stride`
    frames per latent frame."""

    channels: int = 16
    spatial_stride: int = 8
    temporal_stride: int = 4


DEFAULT_LATENTS = LatentFormat()  # 16 channels, 8x spatial, 4x temporal (Wan2.1's VAE)


def latent_shape(
    num_frames: int, height: int, width: int, latents: LatentFormat = DEFAULT_LATENTS
) -> tuple[int, int, int]:
    """(F, H/s, W/s) latent grid of a video, s = `latents.spatial_stride`; F = (num_frames - 1) // t + 1."""
    return (
        (num_frames - 1) // latents.temporal_stride + 1,
        height // latents.spatial_stride,
        width // latents.spatial_stride,
    )


def token_grid(
    num_frames: int, height: int, width: int, patch_size: tuple[int, int, int],
    latents: LatentFormat = DEFAULT_LATENTS,
) -> tuple[int, int, int]:
    """(T, Hh, Ww) token grid after patchify of a video's latent grid (`latent_shape`)."""
    return tuple(n // p for n, p in zip(latent_shape(num_frames, height, width, latents), patch_size, strict=True))


class TextEncoder(Protocol):
    """Prompt encoder: `encode` -> [B, max_length, text_dim] on the encoder's device (fp32 or model dtype).
    Positions past each prompt's token count are zero; the DiT cross-attends to all `max_length` positions."""

    text_dim: int
    max_length: int

    def encode(self, prompts: Sequence[str]) -> Tensor: ...


class LatentDecoder(Protocol):
    """Latents [B, C, F, H, W] (normalised, as the sampler produces them) -> uint8 frames [B, T, sH, sW, 3] on the
    latents' device (None on ranks that do not gather them)."""

    def decode(self, latents_BCFHW: Tensor) -> Tensor | None: ...


@runtime_checkable
class SelfAttention(Protocol):
    """Self-attention over this rank's token shard: ``attn(q, k, v, gate) -> out``, all [B, S_local, N, D].

    The model passes ``gate_BSND`` (from ``attn1.to_gate_compress``) only when ``uses_gate`` is True and
    the block has that layer, else None. The output has the dtype of ``q``.
    """

    uses_gate: bool

    def __call__(self, q_BSND: Tensor, k_BSND: Tensor, v_BSND: Tensor, gate_BSND: Tensor | None) -> Tensor: ...


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True, kw_only=True)
class ForwardContext:
    """Everything a forward needs beyond the weights, built once per request (and step plan) by the runtime.

    token_order: [S] processing position -> raster token index (None = raster order).
    token_order_inverse: [S] raster token index -> processing position (None = raster order).
        Either may live on the host (pinned, for a CUDA forward): the forward copies it to the tokens' device where
        it permutes them (``attention.vsa.on_device``) and drops the copy, so it takes no device memory between
        forwards.
    shard / gather: full sequence [B, S, C] <-> this rank's contiguous shard [B, S_local, C] (dim 1);
        gather is a collective when sp > 1. Identity on one device.
    rope: (cos, sin) from the DiT's ``rope_tables``, already permuted by token_order and sharded.
    attn: one SelfAttention per block (attention and the sequence-parallel exchange are injected here).
    clean_tokens: bool [S_local, 1], this rank's tokens in processing order, True where the token's timestep is 0
        (the DiT's ``first_frame_tokens`` permuted and sharded: a clean first latent frame that holds an image's
        latents). None: every token at the step's timestep (the default path).
    """

    rope: tuple[Tensor, Tensor]
    attn: Sequence[SelfAttention]
    token_order: Tensor | None = None
    token_order_inverse: Tensor | None = None
    shard: Callable[[Tensor], Tensor] = field(default=_identity)
    gather: Callable[[Tensor], Tensor] = field(default=_identity)
    clean_tokens: Tensor | None = None


@dataclass(frozen=True)
class ImageCondition:
    """What one request's image adds to every forward. `condition_BCFHW`: fp32 on the device, [1, Cc, F, H, W]
    (channels concatenated to the input, e.g. a mask and first-frame latents) or, with `first_frame_mask_BCFHW`,
    [1, C, 1, H, W] (the image's latents, the clean first latent frame); None for text-only requests.
    `first_frame_mask_BCFHW`: fp32 [1, 1, F, H, W], 0 on latent frame 0 and 1 elsewhere. `embeds_BIC`: image-encoder
    states [B, I, image_dim] in the model dtype, B the loop's batch (None without an image branch); `report`: what
    the JSON report says about the image (rank 0's)."""

    condition_BCFHW: Tensor | None = None
    embeds_BIC: Tensor | None = None
    report: dict = field(default_factory=dict)
    first_frame_mask_BCFHW: Tensor | None = None

    @property
    def clean_first_frame(self) -> bool:
        """Whether the first latent frame is the image's, kept clean: its tokens run at timestep 0."""
        return self.first_frame_mask_BCFHW is not None

    def model_input(self, latents_BCFHW: Tensor, dtype: torch.dtype, batch: int) -> Tensor:
        """The forward's hidden states [batch, C_in, F, H, W] in `dtype`: the noisy latents, then the condition
        channels (diffusers: `torch.cat([latents, condition], dim=1).to(transformer_dtype)`), or the latents
        with the first frame replaced by the image's (`with_clean_first_frame`)."""
        if self.first_frame_mask_BCFHW is not None:
            latents_BCFHW = self.with_clean_first_frame(latents_BCFHW)
        elif self.condition_BCFHW is not None:
            latents_BCFHW = torch.cat([latents_BCFHW, self.condition_BCFHW], dim=1)
        return latents_BCFHW.to(dtype).expand(batch, -1, -1, -1, -1)

    def with_clean_first_frame(self, latents_BCFHW: Tensor) -> Tensor:
        """A clean first frame: `(1 - mask) * condition + mask * latents` as diffusers writes it (exact: the mask is
        0 or 1), applied to every model input and once to the final latents; the latents unchanged otherwise."""
        mask = self.first_frame_mask_BCFHW
        if mask is None:
            return latents_BCFHW
        return (1 - mask) * self.condition_BCFHW + mask * latents_BCFHW


TEXT_ONLY = ImageCondition()


class DiT(Protocol):
    """What the runtime reads from a family's DiT (an `nn.Module`): its config (`num_attention_heads`,
    `attention_head_dim`, `num_layers`, `patch_size`, `text_dim`), its `blocks` (each with its self-attention module as
    `attn1`), and per request the RoPE tables and the first latent frame's tokens of a token grid."""

    config: Any
    blocks: Any

    def rope_tables(self, grid_thw: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]: ...

    def first_frame_tokens(self, grid_thw: tuple[int, int, int], device: torch.device) -> Tensor: ...

    def use_fast_stages(self, compile: bool) -> None:
        """Called once the weights are on a CUDA device: switch to the fast kernels; `compile` is `model.compile`."""


class ModelFamily(Protocol):
    """One model family, as the runtime asks for it (`models/wan/family.py` is the reference). Checkpoints and
    architecture configs are the family's own typed objects; the runtime passes them back without looking inside,
    except for the fields named here. Every check raises ValueError naming the key and the fix, before any weight
    loads.

    Checkpoint and architecture (JSON and safetensors headers only):
      claims(path) -> bool: whether `model.path` is a checkpoint of this family.
      resolve(path) -> checkpoint: `.path`, `.arch` (config fields; None for a bare weights file), `.text_encoder`
          (where its text encoder lives, None without one), `.weights_2` (a second expert) are read by the runtime.
      checkpoint_at(path, resolved) -> `resolved` when it is the checkpoint at `path`, else `resolve(path)`.
      resolve_model(preset, preset_arch, explicit, path, *, preset_boundary_ratio, checkpoint) -> (arch dict,
          generation defaults the checkpoint implies, as nested config dicts).
      arch_mismatches(preset_arch, arch) -> ["key: preset X vs checkpoint Y", ...].
      check_expert_config(boundary_ratio, checkpoint): `model.boundary_ratio` against the checkpoint's experts.
      check_checkpoint_request(checkpoint, *, height, width, preset, image): what the checkpoint alone decides.
      check_request(checkpoint, config, *, height, width, preset, image, where): size and image of a request.
      latents(checkpoint) -> LatentFormat; image_optional(checkpoint, preset) -> bool.
      config(arch) -> the typed config (a frozen dataclass): `num_attention_heads`, `attention_head_dim`,
          `num_layers`, `patch_size`, `text_dim`, `dim`, `ffn_dim`, `takes_image`, `parameter_count()`.
      with_gate(config) -> the config whose blocks carry a gate projection (backends with `uses_gate`).
      arch(config) -> the arch dict again (the report).
    Weights and conditioning:
      build_dit(config, device, dtype, checkpoint, *, expert, seed) -> (a `DiT` module, load report dict).
      plan_conditioning(checkpoint, preset) -> which text encoder and latent decoder a run uses (`.text`,
          `.decoder`: names for the report); text_sequence_length(plan) -> L.
      build_text_encoder(plan, text_dim, seed, device, dtype, show_progress) -> TextEncoder.
      build_latent_decoder(plan, seed, device, show_progress, split_rows, dtype) -> LatentDecoder; with
          `streams(H)` / `decode_streaming(latents, sink)` when it can hand frames over as they come.
      plan_image(config, checkpoint, preset) -> None (text only) or an image plan: `clean_first_frame`,
          `condition_shapes(F, H, W)`, `encoders(device)` (`.encode(pil, F, H, W)`), `condition(...)` ->
          ImageCondition.
    """

    name: str
    presets: tuple[str, ...]  # the names of its presets in configs/models/
    random_weight_presets: tuple[str, ...]  # presets that run with random weights (no checkpoint needed)


_FAMILIES: dict[str, ModelFamily] = {}  # registration data, written at import; no run-time state


def register_family(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family (tests that register one)."""
    del _FAMILIES[name]


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def preset_names() -> tuple[str, ...]:
    """Every registered family's presets, in registration order."""
    return tuple(name for family in _FAMILIES.values() for name in family.presets)


def random_weight_presets() -> tuple[str, ...]:
    return tuple(name for family in _FAMILIES.values() for name in family.random_weight_presets)


def family_for(path: str | Path | None, preset: str) -> ModelFamily:
    """The family of `model.path` (the first that claims it), else the one whose presets include `preset`."""
    if path is not None:
        for family in _FAMILIES.values():
            if family.claims(Path(path)):
                return family
    for family in _FAMILIES.values():
        if preset in family.presets:
            return family
    raise ValueError(f"model.preset={preset!r} is unknown. Set model.preset to one of: {', '.join(preset_names())}.")
