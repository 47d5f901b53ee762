"""The `image` key of a request: checks of files, API objects and server uploads, loading as diffusers does, the
aspect-ratio warning, and `ImageConditioner`, which runs the model family's image encoders on rank 0 and broadcasts
what they give (the family's image plan says what that is: see `models/family.py` `ImageCondition`)."""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.distributed as dist
from tessera.models.family import TEXT_ONLY, ImageCondition
from tessera.parallel import ParallelMesh
from tessera.runtime.config import GenerateConfig

if TYPE_CHECKING:
    import PIL.Image

__all__ = [
    "ASPECT_WARNING_STRETCH", "ImageConditioner", "ImageInput", "aspect_warning", "check_image_file",
    "check_image_object", "load_image", "request_image_path",
]

# The image is resized to height x width without cropping (as diffusers does): warn when that stretches one axis by
# more than 20% relative to the other, e.g. a 4:3 photo for 832x480 (x1.30), not a 3:2 one for 1280x720 (x1.19).
ASPECT_WARNING_STRETCH = 1.2
ImageInput = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: UP007 (a string forward reference)
_EXAMPLE = "image=inputs/first_frame.png"


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


class ImageConditioner:
    """Makes each request's `ImageCondition` on the mesh from the family's plan (None: a text-only model): rank 0
    reads the image and encodes it (the plan's encoders, loaded on first use and kept), one broadcast per tensor gives
    every rank the same values, so ranks never disagree and only rank 0 needs the file (the server writes it there).
    Every rank builds it and calls `condition`."""

    def __init__(self, plan: Any, mesh: ParallelMesh, dtype: torch.dtype) -> None:
        self.plan, self.mesh, self.dtype = plan, mesh, dtype
        self._encoders = None

    def condition(self, cfg: GenerateConfig, image: ImageInput | None, batch: int) -> ImageCondition:
        """The request's condition (TEXT_ONLY for a text-only model, or one whose image is optional and not given);
        `image` (rank 0's is used) or `cfg.image`."""
        if self.plan is None or (self.plan.clean_first_frame and image is None and cfg.image is None):
            return TEXT_ONLY
        plan, mesh, device = self.plan, self.mesh, self.mesh.device
        condition_shape, embeds_shape = plan.condition_shapes(cfg.num_frames, cfg.height, cfg.width)
        condition, embeds = torch.empty(condition_shape, device=device), torch.empty(embeds_shape, device=device)
        report: dict = {}
        if mesh.is_main:
            t0 = time.perf_counter()
            if self._encoders is None:
                self._encoders = plan.encoders(device)
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
            if embeds.numel():
                dist.broadcast(embeds, src=0)
        return plan.condition(condition, embeds, cfg.num_frames, self.dtype, batch, report)
