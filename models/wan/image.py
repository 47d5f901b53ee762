"""Image conditioning of the Wan family, made once per request exactly as diffusers' WanImageToVideoPipeline does.

Wan2.1 I2V takes two inputs from the first frame: the CLIP image states (the checkpoint's image_encoder/ +
image_processor/, `hidden_states[-2]`) that the DiT cross-attends to, and 20 condition channels (a 4-channel
first-frame mask, then the VAE latents of the image followed by num_frames - 1 black frames, normalised with the
VAE's latents_mean/std) that every step concatenates after the 16 noisy latent channels
(`ImageCondition.model_input`). Wan2.2 TI2V-5B (an image is optional) has neither: the VAE latents of the image alone
replace the first latent frame of every model input and of the final latents, and that frame's tokens get timestep 0
(diffusers' `expand_timesteps` path). The encoders run in fp32, as diffusers' examples load them. Where they run and
how their results reach every rank is the runtime's (`runtime/image_conditioning.py`).
Shape legend: B batch, I image tokens, C channels, F latent frames, H/W latent height/width, T video frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tessera.models.family import ImageCondition, LatentFormat, latent_shape
from tessera.models.wan.checkpoint import Checkpoint, starts_from_optional_image
from tessera.models.wan.config import WanConfig
from torch import Tensor

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["MASK_CHANNELS", "ImageConditioningPlan", "ImageEncoders", "check_image_request", "plan_image_conditioning"]

MASK_CHANNELS = 4  # = the VAE's temporal stride: one mask channel per frame packed into a latent frame
_EXAMPLE = "image=inputs/first_frame.png"


@dataclass(frozen=True)
class ImageConditioningPlan:
    """Where the image encoders live and the shapes they give (read from their configs, before any load)."""

    vae_dir: Path
    latents: LatentFormat  # the VAE's channels (z_dim) and compression (TI2V: Wan2.2's, 48 channels, 16x spatial)
    clean_first_frame: bool = False  # Wan2.2 TI2V: an optional image, its latents the clean first latent frame
    image_encoder_dir: Path | None = None  # None: no CLIP branch (a DiT without image_dim)
    image_processor_dir: Path | None = None
    image_processor_class: str = "CLIPImageProcessor"
    num_image_tokens: int = 0  # I = (image_size / patch_size)^2 + 1 (class token)
    image_dim: int = 0

    def condition_shapes(self, num_frames: int, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(condition, CLIP states) shapes of one request's `ImageEncoders.encode` output (fp32, batch 1)."""
        f, h, w = latent_shape(num_frames, height, width, self.latents)
        if self.clean_first_frame:  # the image's latents only: one latent frame
            return (1, self.latents.channels, 1, h, w), (1, 0, 0)
        return (1, MASK_CHANNELS + self.latents.channels, f, h, w), (1, self.num_image_tokens, self.image_dim)

    def encoders(self, device: torch.device) -> ImageEncoders:
        """The encoders (CLIP, image processor, VAE: fp32) on `device`, loaded now; the caller keeps them."""
        return ImageEncoders(self, device)

    def condition(self, condition: Tensor, embeds: Tensor, num_frames: int, dtype: torch.dtype, batch: int,
                  report: dict) -> ImageCondition:
        """The request's `ImageCondition` from `encode`'s tensors (the same on every rank): the CLIP states in `dtype`
        for the loop's `batch`, and (TI2V) the first-frame mask, as WanImageToVideoPipeline.prepare_latents with
        expand_timesteps makes it."""
        embeds_BIC = embeds.to(dtype).expand(batch, -1, -1) if self.image_dim else None
        mask = None
        if self.clean_first_frame:
            f, h, w = (num_frames - 1) // self.latents.temporal_stride + 1, condition.shape[3], condition.shape[4]
            mask = torch.ones(1, 1, f, h, w, device=condition.device)
            mask[:, :, 0] = 0
        return ImageCondition(condition_BCFHW=condition, embeds_BIC=embeds_BIC, report=report,
                              first_frame_mask_BCFHW=mask)


def check_image_request(model_cfg: WanConfig, image: str | None, *, where: str, image_optional: bool = False) -> None:
    """ValueError when a request's image (`image`: its name, None without one) does not fit the model (`where`:
    "model.path=..." or "model.preset=..."): an image for a text-only model, or none for an image-to-video one.
    `image_optional`: the model takes an image or none (Wan2.2 TI2V-5B,
    `checkpoint.starts_from_optional_image`). Cheap; runs before any weight load (preflight, `Pipeline`, the API's
    request check)."""
    if image_optional:
        return
    if image is not None and not model_cfg.takes_image:
        raise ValueError(
            f"image={image} was given but {where} is a text-to-video model (its DiT takes "
            f"no image: in_channels={model_cfg.in_channels}, no image_dim). Fix: drop image, or load an "
            f"image-to-video checkpoint such as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers."
        )
    if image is None and model_cfg.takes_image:
        raise ValueError(
            f"image is missing: {where} is an image-to-video model (in_channels={model_cfg.in_channels}, "
            f"image_dim={model_cfg.image_dim}) that starts the video from a first frame. Fix: {_EXAMPLE} (a PNG or "
            f"JPEG file; the Python API also takes a PIL image or a uint8 [H, W, 3] array)."
        )


def plan_image_conditioning(
    model_cfg: WanConfig, ckpt: Checkpoint | None, preset: str
) -> ImageConditioningPlan | None:
    """None for a text-only model; else where the image encoders live and their shapes, read from JSON only.
    `ckpt` is `model.path` resolved (None without one).

    ValueError naming model.path and what is missing (image_encoder/, image_processor/, vae/) or inconsistent."""
    if starts_from_optional_image(ckpt, preset):
        if ckpt.vae is None:
            raise ValueError(f"model.path={ckpt.path} lacks vae/: Wan2.2 TI2V-5B encodes an image with its VAE. "
                             f"Fix: download the complete diffusers checkpoint (Wan-AI/Wan2.2-TI2V-5B-Diffusers).")
        return ImageConditioningPlan(vae_dir=ckpt.vae, latents=ckpt.latents, clean_first_frame=True)
    if not model_cfg.takes_image:
        return None
    parts = {"vae/": ckpt and ckpt.vae}
    if model_cfg.image_dim is not None:
        parts.update({"image_encoder/": ckpt and ckpt.image_encoder, "image_processor/": ckpt and ckpt.image_processor})
    missing = [name for name, where in parts.items() if where is None]
    if missing:
        raise ValueError(
            f"model.path={ckpt and ckpt.path} lacks {', '.join(missing)}: an image-to-video model encodes the first "
            f"frame with the checkpoint's CLIP image encoder (image_encoder/, image_processor/) and its VAE (vae/). "
            f"Fix: download the complete diffusers checkpoint (e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)."
        )
    z_dim = ckpt.latents.channels  # vae/config.json's, read when the checkpoint was resolved
    if model_cfg.condition_channels != MASK_CHANNELS + z_dim or model_cfg.out_channels != z_dim:
        raise ValueError(
            f"model.path={ckpt.path}: transformer/config.json has in_channels={model_cfg.in_channels} and "
            f"out_channels={model_cfg.out_channels}, but image-to-video with this VAE (z_dim={z_dim}) needs "
            f"out_channels={z_dim} and in_channels={2 * z_dim + MASK_CHANNELS} (noisy latents + 4 mask + first-frame "
            f"latents): transformer/ and vae/ come from different models."
        )
    clip = {} if model_cfg.image_dim is None else _clip_fields(ckpt, model_cfg)
    return ImageConditioningPlan(vae_dir=ckpt.vae, latents=ckpt.latents, **clip)


def _clip_fields(ckpt: Checkpoint, model_cfg: WanConfig) -> dict[str, Any]:
    """The plan's CLIP fields: directories, processor class, token count and width (checked against image_dim)."""
    config = _json(ckpt.image_encoder / "config.json")
    config = config.get("vision_config", config)  # a full CLIPModel config nests the vision tower's
    hidden, image_size, patch = (int(config.get(k, d)) for k, d in
                                 (("hidden_size", 768), ("image_size", 224), ("patch_size", 32)))
    if hidden != model_cfg.image_dim:
        raise ValueError(
            f"model.path={ckpt.path}: image_encoder/ gives {hidden}-dim states but transformer/config.json has "
            f"image_dim={model_cfg.image_dim}: image_encoder/ and transformer/ come from different models."
        )
    return dict(image_encoder_dir=ckpt.image_encoder, image_processor_dir=ckpt.image_processor,
                image_processor_class=ckpt.image_processor_class or "CLIPImageProcessor",
                num_image_tokens=(image_size // patch) ** 2 + 1, image_dim=hidden)


def _json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {file} as JSON: {err}") from err


class ImageEncoders:
    """Rank 0's CLIP vision model, image processor, VAE and VideoProcessor (all fp32), from the checkpoint."""

    def __init__(self, plan: ImageConditioningPlan, device: torch.device) -> None:
        import transformers
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor

        self.plan, self.device = plan, device
        self.vae = AutoencoderKLWan.from_pretrained(str(plan.vae_dir), torch_dtype=torch.float32).to(device).eval()
        vae_cfg = self.vae.config
        self.video_processor = VideoProcessor(vae_scale_factor=vae_cfg.scale_factor_spatial)
        shape = (1, vae_cfg.z_dim, 1, 1, 1)
        self._mean = torch.tensor(vae_cfg.latents_mean, dtype=torch.float32, device=device).view(shape)
        self._inv_std = 1.0 / torch.tensor(vae_cfg.latents_std, dtype=torch.float32, device=device).view(shape)
        self.clip = self.processor = None
        if plan.image_encoder_dir is not None:
            processor_cls = getattr(transformers, plan.image_processor_class, transformers.CLIPImageProcessor)
            self.processor = processor_cls.from_pretrained(str(plan.image_processor_dir))
            self.clip = transformers.CLIPVisionModel.from_pretrained(str(plan.image_encoder_dir),
                                                                     dtype=torch.float32).to(device).eval()

    @torch.inference_mode()
    def encode(self, image: PIL.Image.Image, num_frames: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """(condition fp32 [1, 4 + z_dim, F, H/s, W/s], or TI2V [1, z_dim, 1, H/s, W/s]; CLIP states fp32 [1, I,
        image_dim] or an empty [1, 0, 0])."""
        embeds_BIC = torch.empty(1, 0, 0, device=self.device)
        if self.clip is not None:  # WanImageToVideoPipeline.encode_image
            pixels = self.processor(images=image, return_tensors="pt").to(self.device)
            embeds_BIC = self.clip(**pixels, output_hidden_states=True).hidden_states[-2].float()
        # WanImageToVideoPipeline.prepare_latents: the image, then (not TI2V) num_frames - 1 zero frames, through the
        # VAE encoder (its latent mode), normalised as (x - mean) * (1 / std).
        image_B3HW = self.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        video_B3THW = image_B3HW[:, :, None]
        if not self.plan.clean_first_frame:
            video_B3THW = torch.cat([video_B3THW, image_B3HW.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        latents_BCFHW = self.vae.encode(video_B3THW).latent_dist.mode().float()
        latents_BCFHW = (latents_BCFHW - self._mean) * self._inv_std
        if self.plan.clean_first_frame:
            return latents_BCFHW, embeds_BIC
        # The mask, one channel per frame of a latent frame (4), is 1 for the first video frame only: diffusers
        # repeats frame 0 four times and folds (4F frames) into (F, 4), so it is 1 on latent frame 0, all channels.
        mask_BCFHW = torch.zeros(1, MASK_CHANNELS, *latents_BCFHW.shape[2:], device=self.device)
        mask_BCFHW[:, :, 0] = 1.0
        return torch.cat([mask_BCFHW, latents_BCFHW], dim=1), embeds_BIC
