"""The Wan latent format and the tiny stand-ins for the text encoder and the VAE (`models.family`'s `TextEncoder` /
`LatentDecoder`), which serve the `wan-tiny` preset: deterministic (CPU generators, same output on every rank), no
weights to load. The real UMT5 encoder and Wan VAE are in `components.py`.
Shape legend: B batch, L text tokens, C channels, F latent frames, H/W latent height/width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch
from tessera.models.family import LatentFormat
from torch import Tensor

__all__ = [
    "TinyLatentDecoder", "TinyTextEncoder", "WAN21_LATENTS", "WAN21_LATENT_RGB_BIAS", "WAN21_LATENT_RGB_FACTORS",
    "hf_progress_bars", "num_video_frames",
]

VAE_TEMPORAL_STRIDE = 4  # Wan VAE: first frame alone, then 4 frames per latent frame
VAE_SPATIAL_STRIDE = 8
# Wan2.1's VAE (also Wan2.2 A14B's): 16 channels, 8x spatial; Wan2.2's (TI2V-5B) has 48 channels, 16x spatial.
WAN21_LATENTS = LatentFormat()

# Linear latent -> RGB preview of Wan2.1 (16 channels, normalised latent space), from ComfyUI's
# comfy/latent_formats.py `Wan21.latent_rgb_factors` / `latent_rgb_factors_bias`: rgb ~ in [-1, 1].
WAN21_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_LATENT_RGB_BIAS: tuple[float, float, float] = (-0.1835, -0.0868, -0.3360)


def num_video_frames(num_latent_frames: int) -> int:
    """Pixel frames decoded from `num_latent_frames` latent frames: (F - 1) * 4 + 1."""
    return (num_latent_frames - 1) * VAE_TEMPORAL_STRIDE + 1


class TinyTextEncoder:
    """Deterministic byte-level stand-in for UMT5 (wan-tiny preset); not a language model.

    Token p of a prompt = table[utf8_byte_p] + pos[p] for p < min(len(bytes), max_length), zero beyond;
    an empty prompt gives all zeros. `table` [256, text_dim] and `pos` [max_length, text_dim] come from a
    CPU `torch.Generator` seeded with `seed`, so every rank and device gets the same embeddings.
    """

    def __init__(
        self, text_dim: int, max_length: int = 32, seed: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        if text_dim < 1 or max_length < 1:
            raise ValueError(f"text_dim={text_dim} and max_length={max_length} must be >= 1")
        self.text_dim = text_dim
        self.max_length = max_length
        self.device = torch.device(device)
        gen = torch.Generator("cpu").manual_seed(seed)
        self._table = torch.randn(256, text_dim, generator=gen, dtype=torch.float32)
        self._pos = 0.1 * torch.randn(max_length, text_dim, generator=gen, dtype=torch.float32)

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """prompts: B strings -> float32 [B, max_length, text_dim] on `self.device`."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single str: wrap it as [prompt]")
        out_BLC = torch.zeros(len(prompts), self.max_length, self.text_dim, dtype=torch.float32)
        for b, prompt in enumerate(prompts):
            ids = list(prompt.encode("utf-8")[: self.max_length])
            if ids:
                n = len(ids)
                out_BLC[b, :n] = self._table[torch.tensor(ids, dtype=torch.long)] + self._pos[:n]
        return out_BLC.to(self.device)


class TinyLatentDecoder:
    """Preview decoder, NOT a VAE: a per-pixel linear 16 -> 3 map, nearest-neighbour upsampling, uint8.

    seed None: Wan2.1's published latent->RGB preview factors (meaningful for real checkpoints);
    seed int: a seeded random projection (unit gain), for random-weight models. rgb -> clamp((rgb+1)/2) * 255.
    Temporal upsampling mirrors the Wan VAE's frame count: latent frame 0 -> 1 frame, every later one -> 4.
    """

    def __init__(self, seed: int | None = None, latent_channels: int = 16) -> None:
        self.latent_channels = latent_channels
        if seed is None:
            if latent_channels != len(WAN21_LATENT_RGB_FACTORS):
                raise ValueError(f"the Wan2.1 preview factors need 16 latent channels, got {latent_channels}")
            self._weight_CK = torch.tensor(WAN21_LATENT_RGB_FACTORS, dtype=torch.float32)
            self._bias_K = torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=torch.float32)
        else:
            gen = torch.Generator("cpu").manual_seed(seed)
            # 1/sqrt(C): unit-variance latents map to unit-variance colours.
            self._weight_CK = torch.randn(latent_channels, 3, generator=gen) / latent_channels**0.5
            self._bias_K = torch.zeros(3)

    def decode(self, latents_BCFHW: Tensor) -> Tensor:
        """latents [B, C, F, H, W] (any float dtype) -> uint8 [B, (F-1)*4+1, 8H, 8W, 3] on the same device."""
        if latents_BCFHW.ndim != 5 or latents_BCFHW.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be [B, {self.latent_channels}, F, H, W], got {tuple(latents_BCFHW.shape)}"
            )
        device = latents_BCFHW.device
        weight_CK, bias_K = self._weight_CK.to(device), self._bias_K.to(device)
        # Project at latent resolution: nearest upsampling commutes with per-pixel maps.
        rgb_BFHWK = torch.einsum("bcfhw,ck->bfhwk", latents_BCFHW.float(), weight_CK) + bias_K
        pixels = ((rgb_BFHWK + 1) * 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        num_latent_frames = pixels.shape[1]
        repeats = torch.full((num_latent_frames,), VAE_TEMPORAL_STRIDE, device=device)
        repeats[0] = 1
        pixels = pixels.repeat_interleave(repeats, dim=1, output_size=num_video_frames(num_latent_frames))
        pixels = pixels.repeat_interleave(VAE_SPATIAL_STRIDE, dim=2).repeat_interleave(
            VAE_SPATIAL_STRIDE, dim=3
        )
        return pixels.contiguous()


@contextlib.contextmanager
def hf_progress_bars(hf_logging: ModuleType, show: bool) -> Iterator[None]:
    """Hide the loading bars of transformers or diffusers (`hf_logging` is its utils.logging) unless `show`.

    The switch is process-global in both libraries: the state before is restored on exit.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not show and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not show and was_enabled:
            hf_logging.enable_progress_bar()
