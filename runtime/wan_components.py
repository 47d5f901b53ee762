"""Real Wan2.1 conditioning from a diffusers checkpoint: UMT5 text encoder and Wan VAE decoder (extra `[wan]`).

`plan_conditioning` decides, before any weight load, which encoder/decoder a run uses (the checkpoint's UMT5 +
VAE, or the tiny stand-ins of `wan-tiny`) and fails early with what is missing. transformers and diffusers are
imported lazily inside functions, so the base install never needs them.
Shape legend: B batch, L text tokens, C channels, F latent frames, H/W latent height/width, T video frames.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from tessera.runtime.checkpoint import Checkpoint, resolve_checkpoint
from tessera.runtime.conditioning import LatentDecoder, TextEncoder, TinyLatentDecoder, TinyTextEncoder
from tessera.runtime.config import RANDOM_WEIGHT_PRESETS, GenerateConfig
from torch import Tensor

__all__ = [
    "ConditioningPlan",
    "UMT5TextEncoder",
    "WanVAEDecoder",
    "build_latent_decoder",
    "build_text_encoder",
    "text_sequence_length",
    "plan_conditioning",
    "prompt_clean",
]

MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default max_sequence_length
TINY_TEXT_LENGTH = 32  # the byte-level stand-in's sequence length
_INSTALL_HINT = 'pip install -e ".[wan]"'


@dataclass(frozen=True)
class ConditioningPlan:
    """Which text encoder and decoder a run uses; directories are set for the real ones."""

    text: str  # "umt5" | "tiny"
    decoder: str  # "wan-vae" | "tiny-preview"
    text_encoder_dir: Path | None = None
    tokenizer_dir: Path | None = None
    vae_dir: Path | None = None


def plan_conditioning(cfg: GenerateConfig) -> ConditioningPlan:
    """Cheap (JSON + imports): real UMT5/VAE for checkpoints that carry them, tiny ones for `wan-tiny` otherwise.

    ValueError naming model.path and what is missing for a real preset without text_encoder/tokenizer/vae, and
    naming `pip install -e ".[wan]"` when transformers/diffusers are absent.
    """
    ckpt: Checkpoint | None = None if cfg.model.path is None else resolve_checkpoint(cfg.model.path)
    if ckpt is None or (ckpt.kind != "diffusers" and cfg.model.preset in RANDOM_WEIGHT_PRESETS):
        return ConditioningPlan(text="tiny", decoder="tiny-preview")
    missing = ckpt.missing_components()
    if missing:
        what = "a native Wan2.1 directory" if ckpt.kind == "native" else f"a {ckpt.kind} checkpoint"
        raise ValueError(
            f"model.path={ckpt.path} ({what}) lacks {', '.join(missing)}: a real Wan2.1 run needs the UMT5 text "
            f"encoder, its tokenizer and the Wan VAE in diffusers format (text_encoder/, tokenizer/, vae/ beside "
            f"transformer/, as in Wan-AI/Wan2.1-T2V-1.3B-Diffusers). Download the complete diffusers checkpoint, "
            f"or use model.preset=wan-tiny with a DiT-only checkpoint."
        )
    _require_wan_extra(ckpt.path)
    return ConditioningPlan(
        text="umt5", decoder="wan-vae", text_encoder_dir=ckpt.text_encoder, tokenizer_dir=ckpt.tokenizer,
        vae_dir=ckpt.vae,
    )


def text_sequence_length(plan: ConditioningPlan) -> int:
    """L of the embeddings [B, L, text_dim] the plan's encoder gives (known without loading it)."""
    return TINY_TEXT_LENGTH if plan.text == "tiny" else MAX_SEQUENCE_LENGTH


def build_text_encoder(
    plan: ConditioningPlan,
    text_dim: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = True,
) -> TextEncoder:
    """`show_progress=False` hides transformers' loading bars (on every rank but 0, so they appear once)."""
    if plan.text == "tiny":
        return TinyTextEncoder(text_dim, max_length=TINY_TEXT_LENGTH, seed=seed, device=device)
    encoder = UMT5TextEncoder(
        plan.text_encoder_dir, plan.tokenizer_dir, device=device, dtype=dtype, show_progress=show_progress
    )
    if encoder.text_dim != text_dim:
        raise ValueError(
            f"the checkpoint's text encoder gives {encoder.text_dim}-dim embeddings but the DiT expects "
            f"text_dim={text_dim}: text_encoder/ and transformer/ come from different models."
        )
    return encoder


def build_latent_decoder(
    plan: ConditioningPlan, seed: int, device: torch.device, show_progress: bool = True
) -> LatentDecoder:
    """`show_progress=False` hides diffusers' loading bars (on every rank but 0, so they appear once)."""
    if plan.decoder == "tiny-preview":
        return TinyLatentDecoder(seed=seed)
    return WanVAEDecoder(plan.vae_dir, device=device, show_progress=show_progress)


def free_device_memory(device: torch.device) -> None:
    """Return cached blocks to the driver after dropping a large module (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning, as diffusers' WanPipeline: ftfy (when installed), html unescape, whitespace."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder:
    """UMT5 encoder + tokenizer from a diffusers checkpoint; `encode` matches WanPipeline's prompt embeddings.

    Prompts are cleaned, tokenized to `max_length` (512) with truncation and an attention mask; embeddings past
    each prompt's token count are zeroed. Output [B, max_length, text_dim] in `dtype` on `device`.
    """

    def __init__(
        self,
        text_encoder_dir: Path,
        tokenizer_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_length: int = MAX_SEQUENCE_LENGTH,
        show_progress: bool = True,
    ) -> None:
        import transformers.utils.logging
        from transformers import AutoTokenizer, UMT5EncoderModel

        with _progress_bars(transformers.utils.logging, show_progress):
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            self.model = UMT5EncoderModel.from_pretrained(str(text_encoder_dir), dtype=dtype).to(device).eval()
        self.device = device
        self.max_length = max_length
        self.text_dim = int(self.model.config.d_model)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single str: wrap it as [prompt]")
        tokens = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids_BL, mask_BL = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        out_BLC = self.model(ids_BL, mask_BL).last_hidden_state
        # WanPipeline keeps u[:seq_len] and pads with zeros: the same as zeroing the masked positions.
        keep_BL1 = (torch.arange(self.max_length, device=self.device)[None] < mask_BL.gt(0).sum(1, keepdim=True))
        return out_BLC * keep_BL1[..., None].to(out_BLC.dtype)


class WanVAEDecoder:
    """diffusers `AutoencoderKLWan` (fp32, as Wan's examples load it) with the checkpoint's latent mean/std.

    `decode`: normalised latents [B, 16, F, H, W] -> uint8 frames [B, T, 8H, 8W, 3], T = 4(F-1)+1, converted as
    diffusers does: VideoProcessor 'np' output ((x/2 + 0.5).clamp(0, 1)) then export_to_video's
    `(frame * 255).astype(uint8)` (truncation).
    """

    def __init__(
        self, vae_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32, show_progress: bool = True
    ) -> None:
        import diffusers.utils.logging
        from diffusers import AutoencoderKLWan

        with _progress_bars(diffusers.utils.logging, show_progress):
            self.vae = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=dtype).to(device).eval()
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        self._mean = torch.tensor(cfg.latents_mean, dtype=dtype, device=device).view(shape)
        self._std = torch.tensor(cfg.latents_std, dtype=dtype, device=device).view(shape)

    @torch.inference_mode()
    def decode_float(self, latents_BCFHW: Tensor) -> Tensor:
        """Frames in [0, 1], float32 [B, T, 8H, 8W, 3] (diffusers' postprocess_video(output_type='np'))."""
        latents = latents_BCFHW.to(device=self._mean.device, dtype=self._mean.dtype)
        # WanPipeline: latents / (1 / std) + mean
        video_BCTHW = self.vae.decode(latents / (1.0 / self._std) + self._mean, return_dict=False)[0]
        return (video_BCTHW * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()

    def decode(self, latents_BCFHW: Tensor) -> Tensor:
        frames = (self.decode_float(latents_BCFHW) * 255).to(torch.uint8)  # truncation, as export_to_video
        return frames.to(latents_BCFHW.device)


@contextlib.contextmanager
def _progress_bars(hf_logging: ModuleType, show: bool) -> Iterator[None]:
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


def _require_wan_extra(model_path: Path) -> None:
    missing = []
    for module in ("transformers", "diffusers"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ValueError(
            f"model.path={model_path} needs the UMT5 text encoder and the Wan VAE, which use "
            f"{' and '.join(missing)} (not installed). Install the extra: {_INSTALL_HINT}"
        )
