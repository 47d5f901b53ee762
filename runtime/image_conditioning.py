"""Image-to-video conditioning (Wan2.1 I2V), made once per request exactly as diffusers' WanImageToVideoPipeline does.

Two inputs come from the first frame: the CLIP image states (the checkpoint's image_encoder/ + image_processor/,
`hidden_states[-2]`) that the DiT cross-attends to, and 20 condition channels (a 4-channel first-frame mask, then the
VAE latents of the image followed by num_frames - 1 black frames, normalised with the VAE's latents_mean/std) that
every step concatenates after the 16 noisy latent channels (`ImageCondition.model_input`). Wan2.2 TI2V-5B (an image is
optional) has neither: the VAE latents of the image alone replace the first latent frame of every model input and of
the final latents, and that frame's tokens get timestep 0 (diffusers' `expand_timesteps` path). Rank 0 alone reads the
image and runs both encoders (fp32, as diffusers' examples load them; kept loaded for later requests); the results
are broadcast to every rank, so ranks never disagree and only rank 0 needs the file (the server writes it there).
Shape legend: B batch, I image tokens, C channels, F latent frames, H/W latent height/width, T video frames.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.distributed as dist
from tessera.models import WanConfig
from tessera.parallel import ParallelMesh
from tessera.runtime.checkpoint import Checkpoint, starts_from_optional_image
from tessera.runtime.conditioning import LatentFormat, latent_shape
from tessera.runtime.config import GenerateConfig
from torch import Tensor

if TYPE_CHECKING:
    import PIL.Image

__all__ = [
    "ASPECT_WARNING_STRETCH",
    "ImageCondition",
    "ImageConditioner",
    "ImageConditioningPlan",
    "ImageInput",
    "TEXT_ONLY",
    "aspect_warning",
    "check_image_file",
    "check_image_object",
    "check_image_request",
    "load_image",
    "plan_image_conditioning",
    "request_image_path",
]

# The image is resized to height x width without cropping (as diffusers does): warn when that stretches one axis by
# more than 20% relative to the other, e.g. a 4:3 photo for 832x480 (x1.30), not a 3:2 one for 1280x720 (x1.19).
ASPECT_WARNING_STRETCH = 1.2
MASK_CHANNELS = 4  # = the VAE's temporal stride: one mask channel per frame packed into a latent frame
ImageInput = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: UP007 (a string forward reference)
_EXAMPLE = "image=inputs/first_frame.png"


@dataclass(frozen=True)
class ImageCondition:
    """What one request adds to every forward. `condition_BCFHW`: fp32 on the device, [1, 20, F, H, W] (Wan2.1 I2V:
    mask + first-frame latents, concatenated to the input) or, with `first_frame_mask_BCFHW`, [1, C, 1, H, W] (Wan2.2
    TI2V: the image's latents, the clean first latent frame); None for text-only requests. `first_frame_mask_BCFHW`:
    fp32 [1, 1, F, H, W], 0 on latent frame 0 and 1 elsewhere (TI2V only). `embeds_BIC`: CLIP states [B, I,
    image_dim] in the model dtype, B the loop's batch (None without a CLIP branch); `report`: what the JSON report
    says about the image (rank 0's)."""

    condition_BCFHW: Tensor | None = None
    embeds_BIC: Tensor | None = None
    report: dict = field(default_factory=dict)
    first_frame_mask_BCFHW: Tensor | None = None

    @property
    def clean_first_frame(self) -> bool:
        """Whether the first latent frame is the image's, kept clean: its tokens run at timestep 0 (TI2V)."""
        return self.first_frame_mask_BCFHW is not None

    def model_input(self, latents_BCFHW: Tensor, dtype: torch.dtype, batch: int) -> Tensor:
        """The forward's hidden states [batch, C_in, F, H, W] in `dtype`: the noisy latents, then the condition
        channels (diffusers: `torch.cat([latents, condition], dim=1).to(transformer_dtype)`), or (TI2V) the latents
        with the first frame replaced by the image's (`with_clean_first_frame`)."""
        if self.first_frame_mask_BCFHW is not None:
            latents_BCFHW = self.with_clean_first_frame(latents_BCFHW)
        elif self.condition_BCFHW is not None:
            latents_BCFHW = torch.cat([latents_BCFHW, self.condition_BCFHW], dim=1)
        return latents_BCFHW.to(dtype).expand(batch, -1, -1, -1, -1)

    def with_clean_first_frame(self, latents_BCFHW: Tensor) -> Tensor:
        """TI2V: `(1 - mask) * condition + mask * latents` as diffusers writes it (exact: the mask is 0 or 1), applied
        to every model input and once to the final latents; the latents unchanged otherwise."""
        mask = self.first_frame_mask_BCFHW
        if mask is None:
            return latents_BCFHW
        return (1 - mask) * self.condition_BCFHW + mask * latents_BCFHW


TEXT_ONLY = ImageCondition()


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


def check_image_request(cfg: GenerateConfig, model_cfg: WanConfig, image_given: bool, *,
                        image_optional: bool = False) -> None:
    """ValueError when a request's image does not fit the model: an image for a text-only model, or none for an
    image-to-video one. `image_optional`: the model takes an image or none (Wan2.2 TI2V-5B,
    `checkpoint.starts_from_optional_image`). Cheap; runs before any weight load (preflight, `Pipeline`, the API's
    request check)."""
    if image_optional:
        return
    where = f"model.path={cfg.model.path}" if cfg.model.path else f"model.preset={cfg.model.preset}"
    if image_given and not model_cfg.takes_image:
        raise ValueError(
            f"image={cfg.image or '<an image object>'} was given but {where} is a text-to-video model (its DiT takes "
            f"no image: in_channels={model_cfg.in_channels}, no image_dim). Fix: drop image, or load an "
            f"image-to-video checkpoint such as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers."
        )
    if not image_given and model_cfg.takes_image:
        raise ValueError(
            f"image is missing: {where} is an image-to-video model (in_channels={model_cfg.in_channels}, "
            f"image_dim={model_cfg.image_dim}) that starts the video from a first frame. Fix: {_EXAMPLE} (a PNG or "
            f"JPEG file; the Python API also takes a PIL image or a uint8 [H, W, 3] array)."
        )


def check_image_file(path: Any) -> tuple[int, int]:
    """(width, height) of the image file `path` (the `image` key), from its header; TypeError/ValueError naming the
    key and the fix when it is not a path, does not exist or cannot be read as an image."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"image={path!r} must be the path of a PNG or JPEG file. Fix: e.g. {_EXAMPLE}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"image={path} does not exist or is not a file. Fix: point image at a PNG or JPEG file, "
                         f"e.g. {_EXAMPLE}")
    from PIL import Image

    try:
        with Image.open(file) as img:
            size = img.size
            img.verify()  # reads the data too (PNG checksums), not only the header: truncated files fail here
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ValueError(f"image={path} cannot be read as an image ({err}). Fix: point image at a PNG or JPEG "
                         f"file that opens in an image viewer") from None
    return size


def request_image_path(value: Any, save_as: Path) -> str:
    """A server request's `image` -> a path: a path on the server as given, or base64 image bytes (optionally a
    `data:image/...;base64,` URL) written to `save_as` + the format's suffix. TypeError/ValueError naming `image`."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"image must be a JSON string: a path on the server or a base64 PNG/JPEG, got "
                        f"{type(value).__name__}. Fix: e.g. \"image\": \"data:image/png;base64,iVBORw0...\"")
    is_data_url = value.startswith("data:")
    if not is_data_url and len(value) < 4096 and Path(value).expanduser().is_file():
        return value
    try:
        data = base64.b64decode(value.partition(",")[2] if is_data_url else value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is neither a file on the server nor base64 image data. Fix: send the PNG or JPEG "
                         "bytes base64-encoded (optionally as a data:image/png;base64,... URL)") from None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            suffix = f".{(img.format or 'img').lower()}"
    except OSError as err:
        raise ValueError(f"image holds {len(data)} base64 bytes that are not an image ({err}). Fix: send the bytes "
                         f"of a PNG or JPEG file") from None
    file = save_as.with_name(save_as.name + suffix)
    file.write_bytes(data)
    return str(file)


def check_image_object(image: Any) -> None:
    """TypeError unless `image` (the Python API's) is a path (checked as `check_image_file`), a PIL image or a uint8
    array [H, W, 3] (RGB), [H, W, 4] (RGBA) or [H, W] (grey). Cheap: runs before any work of the request."""
    if isinstance(image, (str, os.PathLike)):
        check_image_file(image)
        return
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise TypeError(f"image array of dtype {image.dtype} and shape {list(image.shape)} must be uint8 "
                            f"[H, W, 3] (RGB), [H, W, 4] (RGBA) or [H, W] (grey). Fix: e.g. np.asarray(pil_image)")
        return
    import PIL.Image

    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a path, a PIL image or a uint8 numpy array, got {type(image).__name__}. "
                        f"Fix: e.g. {_EXAMPLE}")


def load_image(image: ImageInput) -> PIL.Image.Image:
    """An RGB PIL image (`image` as `check_image_object` accepts it): a file as diffusers' `load_image` reads it
    (EXIF orientation applied), a PIL image as given or an array, converted to RGB when they are not."""
    import PIL.Image
    import PIL.ImageOps

    check_image_object(image)
    if isinstance(image, (str, os.PathLike)):
        with PIL.Image.open(Path(image).expanduser()) as img:
            image = PIL.ImageOps.exif_transpose(img)
            image.load()
    elif isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def aspect_warning(size_WH: tuple[int, int], height: int, width: int) -> str | None:
    """The warning for an image whose aspect ratio is far (> ASPECT_WARNING_STRETCH) from the video's, else None."""
    image_w, image_h = size_WH
    stretch = (image_w / image_h) / (width / height)
    stretch = max(stretch, 1 / stretch)
    if stretch <= ASPECT_WARNING_STRETCH:
        return None
    # Same pixel count at the image's aspect, in multiples of 16 (as diffusers' I2V example sizes it).
    fit_h = max(16, round(math.sqrt(height * width * image_h / image_w) / 16) * 16)
    fit_w = max(16, round(math.sqrt(height * width * image_w / image_h) / 16) * 16)
    return (f"image is {image_w}x{image_h} but the video is {width}x{height}: resizing it without cropping stretches "
            f"it {stretch:.2f}x (warned above {ASPECT_WARNING_STRETCH}x). Fix: height={fit_h} width={fit_w} keeps the "
            f"image's aspect at about the same size, or crop the image.")


def plan_image_conditioning(
    cfg: GenerateConfig, model_cfg: WanConfig, ckpt: Checkpoint | None
) -> ImageConditioningPlan | None:
    """None for a text-only model; else where the image encoders live and their shapes, read from JSON only.
    `ckpt` is `cfg.model.path` resolved (None without one).

    ValueError naming model.path and what is missing (image_encoder/, image_processor/, vae/) or inconsistent."""
    if starts_from_optional_image(cfg, ckpt):
        if ckpt.vae is None:
            raise ValueError(f"model.path={cfg.model.path} lacks vae/: Wan2.2 TI2V-5B encodes an image with its VAE. "
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
            f"model.path={cfg.model.path} lacks {', '.join(missing)}: an image-to-video model encodes the first frame "
            f"with the checkpoint's CLIP image encoder (image_encoder/, image_processor/) and its VAE (vae/). Fix: "
            f"download the complete diffusers checkpoint (e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)."
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


class ImageConditioner:
    """Makes each request's `ImageCondition` on the mesh: rank 0 encodes (`_Encoders`, loaded on first use and kept),
    one broadcast per tensor gives every rank the same values. Every rank builds it and calls `condition`."""

    def __init__(self, plan: ImageConditioningPlan | None, mesh: ParallelMesh, dtype: torch.dtype) -> None:
        self.plan, self.mesh, self.dtype = plan, mesh, dtype
        self._encoders: _Encoders | None = None

    def condition(self, cfg: GenerateConfig, image: ImageInput | None, batch: int) -> ImageCondition:
        """The request's condition (TEXT_ONLY for a text-only model, or TI2V without an image); `image` (rank 0's is
        used) or `cfg.image`."""
        if self.plan is None or (self.plan.clean_first_frame and image is None and cfg.image is None):
            return TEXT_ONLY
        plan, mesh, device = self.plan, self.mesh, self.mesh.device
        f, h, w = latent_shape(cfg.num_frames, cfg.height, cfg.width, self.plan.latents)
        if plan.clean_first_frame:  # the image's latents only: one latent frame
            condition = torch.empty(1, plan.latents.channels, 1, h, w, device=device)
        else:
            condition = torch.empty(1, MASK_CHANNELS + plan.latents.channels, f, h, w, device=device)
        embeds = torch.empty(1, plan.num_image_tokens, plan.image_dim, device=device)
        report: dict = {}
        if mesh.is_main:
            t0 = time.perf_counter()
            if self._encoders is None:
                self._encoders = _Encoders(plan, device)
            source = cfg.image if image is None else image
            pil = load_image(source)
            condition, embeds = self._encoders.encode(pil, cfg.num_frames, cfg.height, cfg.width)
            report = {"source": os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
                      "size": list(pil.size), "encoder_dtype": "float32",
                      "aspect_warning": aspect_warning(pil.size, cfg.height, cfg.width)}
            if report["aspect_warning"]:
                warnings.warn(report["aspect_warning"], stacklevel=3)
            report["encode_seconds"] = time.perf_counter() - t0  # the first request's includes loading the encoders
        if mesh.world_size > 1:
            dist.broadcast(condition, src=0)
            if plan.image_dim:
                dist.broadcast(embeds, src=0)
        embeds_BIC = embeds.to(self.dtype).expand(batch, -1, -1) if plan.image_dim else None
        mask = None
        if plan.clean_first_frame:  # WanImageToVideoPipeline.prepare_latents with expand_timesteps
            mask = torch.ones(1, 1, f, h, w, device=device)
            mask[:, :, 0] = 0
        return ImageCondition(condition_BCFHW=condition, embeds_BIC=embeds_BIC, report=report,
                              first_frame_mask_BCFHW=mask)


class _Encoders:
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
