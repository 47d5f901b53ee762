"""Real Wan conditioning from a diffusers checkpoint: the UMT5 text encoder, and which text encoder and latent
decoder a run uses (extra `[wan]`; the VAE decoder itself is in vae.py).

`plan_conditioning` decides, before any weight load, which encoder/decoder a run uses (the checkpoint's UMT5 +
VAE, or the tiny stand-ins of `wan-tiny`) and fails early with what is missing. transformers and diffusers are
imported lazily inside functions, so the base install never needs them.
Shape legend: B batch, L text tokens.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tessera.models.family import LatentDecoder, TextEncoder
from tessera.models.wan.checkpoint import Checkpoint
from tessera.models.wan.conditioning import TinyLatentDecoder, TinyTextEncoder, hf_progress_bars
from tessera.models.wan.vae import WanVAEDecoder
from torch import Tensor

__all__ = [
    "ConditioningPlan",
    "UMT5TextEncoder",
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

    @property
    def every_rank_decodes(self) -> bool:
        """The VAE decodes on every rank (a block of rows each); the preview decoder on rank 0 alone."""
        return self.decoder == "wan-vae"


def plan_conditioning(ckpt: Checkpoint | None, random_weights: bool) -> ConditioningPlan:
    """Cheap (JSON + imports): real UMT5/VAE for checkpoints that carry them, tiny ones for `wan-tiny` otherwise.
    `ckpt` is `model.path` resolved (None without one); `random_weights`: the preset is one of random weights
    (`wan-tiny`), whose tiny encoder and decoder also serve a DiT-only checkpoint.

    ValueError naming model.path and what is missing for a real preset without text_encoder/tokenizer/vae, and
    naming `pip install -e ".[wan]"` when transformers/diffusers are absent.
    """
    if ckpt is None or (ckpt.kind != "diffusers" and random_weights):
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
    plan: ConditioningPlan, seed: int, device: torch.device, show_progress: bool = True,
    split_rows: Callable[[int], Any] | None = None, dtype: torch.dtype = torch.float32,
) -> LatentDecoder:
    """`show_progress=False` hides diffusers' loading bars (on every rank but 0, so they appear once). The Wan VAE
    decodes in `dtype` (`model.vae_dtype`) over the ranks `split_rows` gives (see `WanVAEDecoder`; every rank
    builds it and calls `decode`); the tiny preview decoder on one rank, always in float32."""
    if plan.decoder == "tiny-preview":
        return TinyLatentDecoder(seed=seed)
    return WanVAEDecoder(plan.vae_dir, device=device, dtype=dtype, show_progress=show_progress, split_rows=split_rows)


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

        with hf_progress_bars(transformers.utils.logging, show_progress):
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
