"""Atomic output writers: video (mp4 via imageio + ffmpeg), JSON report, latents (safetensors).

Every writer writes a hidden temp file next to the target ('.<stem>.tmp-XXXX<suffix>') and renames it into
place, so a crash or error never leaves a partial or corrupt file; the temp file is removed on any error.
`check_output_path` validates the destination before the expensive work starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tessera.runtime.config import DEFAULT_ENCODER_PRESET, ENCODER_PRESETS

__all__ = [
    "VIDEO_SUFFIXES",
    "EncodedVideo",
    "VideoEncodeStream",
    "X264_CRF",
    "check_encoder_preset",
    "check_output_files",
    "check_output_path",
    "next_numbered_path",
    "output_files",
    "write_json_atomic",
    "write_latents_atomic",
    "write_video_atomic",
]
log = logging.getLogger("tessera")

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")  # containers that hold libx264 / yuv420p
# x264's own default rate factor: the one the writer always used (imageio passes no -crf unless given `quality`).
X264_CRF = 23


def _nearest_existing_dir(parent: Path) -> Path:
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_path(path: str | os.PathLike[str], overwrite: bool, *, key: str = "output.path") -> Path:
    """Validate a destination before any expensive work; returns it as a Path.

    Raises ValueError naming `output.path` when the suffix is not a video container, the path is a directory
    or no file can be created in its directory (tried: a temp file is created and removed in the nearest
    existing directory; missing parent directories are fine: writers create them), and naming
    `output.overwrite` when the file exists and `overwrite` is False. Pass `key` to check side files.
    """
    out = Path(path)
    if key == "output.path" and out.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(
            f"{key}={str(path)!r} must end in one of {list(VIDEO_SUFFIXES)} (H.264 in that container)"
        )
    if out.is_dir():
        raise ValueError(f"{key}={str(path)!r} is a directory: give a file name, e.g. {out / 'video.mp4'}")
    existing = _nearest_existing_dir(out.parent if str(out.parent) else Path("."))
    if not existing.is_dir():
        raise ValueError(
            f"{key}={str(path)!r}: {existing} is not a directory; choose another output location"
        )
    _probe_writable(existing, f"{key}={str(path)!r}")
    if out.exists() and not overwrite:
        raise ValueError(
            f"{key}={str(path)!r} already exists: set output.overwrite=true to replace it, or choose another "
            "path"
        )
    return out


def next_numbered_path(directory: str | os.PathLike[str] = "outputs", stem: str = "video") -> Path:
    """`directory/stem-NNN.mp4` with the smallest NNN (from 001) above every number already there: the default
    output, so running the same command twice writes two videos instead of refusing the second."""
    folder = Path(directory)
    taken = [int(p.stem.split(".")[0][len(stem) + 1:]) for p in folder.glob(f"{stem}-*")
             if p.stem.split(".")[0][len(stem) + 1:].isdigit()] if folder.is_dir() else []
    return folder / f"{stem}-{max(taken, default=0) + 1:03d}.mp4"


def output_files(video_path: str | os.PathLike[str], save_latents: bool) -> list[tuple[Path, str]]:
    """(path, config key) of every file a request writes: the video, its JSON report, optionally the latents."""
    video = Path(video_path)
    files = [(video, "output.path"), (video.with_suffix(".json"), "output.path (its JSON report)")]
    if save_latents:
        files.append((video.with_suffix(".latents.safetensors"), "output.save_latents"))
    return files


def check_output_files(video_path: str | os.PathLike[str], save_latents: bool, overwrite: bool) -> None:
    """`check_output_path` for each of `output_files`: runs on every rank before the process group exists, so a
    bad location fails the whole job at once, with one message from rank 0."""
    for path, key in output_files(video_path, save_latents):
        check_output_path(path, overwrite, key=key)


def _probe_writable(directory: Path, what: str) -> None:
    """Create and remove a temp file in ``directory``: the only reliable test (root passes ``os.access``
    everywhere, and /proc or /sys refuse files whatever the mode bits say). Creating the missing
    sub-directories of the target needs the same right in the same directory."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".tessera-probe-", dir=directory)
    except OSError as err:
        raise ValueError(
            f"{what}: cannot create files in {directory} ({err.strerror or err}); choose a writable location"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists and was left untouched: set output.overwrite=true to replace it"
        )


def _umask_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_DEFAULT_FILE_MODE = _umask_file_mode()


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str], overwrite: bool) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and move it into place, on error delete it."""
    out = Path(path)
    _refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _DEFAULT_FILE_MODE)  # mkstemp creates 0600; outputs get the usual umask-derived mode
        if overwrite:
            os.replace(tmp, out)
        else:
            _link_no_clobber(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _link_no_clobber(tmp: Path, out: Path) -> None:
    # os.link fails if `out` appeared meanwhile (another run): never clobber without overwrite.
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise FileExistsError(
            f"{out} appeared while writing and was left untouched: set output.overwrite=true to replace it"
        ) from None
    except OSError:  # filesystem without hard links: re-check, then rename
        _refuse_existing(out, False)
        os.replace(tmp, out)


def _as_frames(frames: Any) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(f"video frames must be uint8, got {frames.dtype}")
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise ValueError(f"video frames must be [num_frames, H, W, 3] (RGB), got shape {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        # yuv420p needs even sizes: replicate the last row / column.
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frames)


def write_video_atomic(
    path: str | os.PathLike[str], frames_FHW3_uint8: Any, fps: int = 16, overwrite: bool = False, *,
    preset: str = DEFAULT_ENCODER_PRESET,
) -> Path:
    """Encode RGB frames (uint8 [num_frames, H, W, 3], numpy or torch) as H.264/yuv420p at `fps`, atomically.

    libx264 at constant rate factor `X264_CRF` with the x264 speed `preset` (`output.encoder_preset`); a preset
    x264 does not know raises ValueError naming that key before anything is encoded. Odd H or W is padded by one
    replicated row/column (yuv420p needs even sizes). Raises FileExistsError (naming output.overwrite=true) if the
    file exists and `overwrite` is False; that file stays untouched.
    """
    check_encoder_preset(preset)
    frames = _as_frames(frames_FHW3_uint8)
    return _write_atomic(path, overwrite, lambda tmp: _encode_video(tmp, frames, fps, preset))


def check_encoder_preset(preset: str) -> None:
    """ValueError naming `output.encoder_preset` unless `preset` is one of x264's speed presets."""
    if preset not in ENCODER_PRESETS:
        raise ValueError(
            f"output.encoder_preset={preset!r} is not an x264 preset. Fix: set output.encoder_preset to one of "
            f"{', '.join(ENCODER_PRESETS)} (faster presets write bigger files at the same quality)."
        )


def _encode_video(tmp: Path, frames: np.ndarray, fps: int, preset: str) -> None:
    writer = _open_writer(tmp, fps, preset)
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _open_writer(tmp: Path, fps: int, preset: str):
    import imageio.v2 as imageio

    return imageio.get_writer(
        tmp,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,  # sizes are already even; never let imageio resize
        ffmpeg_log_level="error",
        output_params=["-preset", preset, "-crf", str(X264_CRF)],
    )


@dataclass(frozen=True, eq=False)
class EncodedVideo:
    """An mp4 already encoded (in a private temp file, removed once this object is garbage) with the settings it was
    encoded with: `write_video_atomic`'s file for the same frames, fps and preset, byte for byte."""

    path: Path
    fps: int
    preset: str

    def __post_init__(self) -> None:
        weakref.finalize(self, _remove, self.path)

    def copy_atomic(self, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """The encoded file at `out` with `write_video_atomic`'s rules (temp file beside it, fsync, no clobber)."""
        return _write_atomic(out, overwrite, lambda tmp: shutil.copyfile(self.path, tmp))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class VideoEncodeStream:
    """Encode a video while its frames are still being made: `put` chunks of uint8 frames [t, H, W, 3] (torch, on
    any device, in order) as they come; a thread moves each to the host and feeds ffmpeg, which encodes in its own
    process. `finish()` returns the `EncodedVideo`, or None if encoding failed (logged: the caller encodes the
    frames the usual way). Same encoder, settings and frames as `write_video_atomic`, so the same bytes."""

    def __init__(self, fps: int, preset: str) -> None:
        check_encoder_preset(preset)
        fd, name = tempfile.mkstemp(prefix="tessera-stream-", suffix=".mp4")
        os.close(fd)
        self.path, self.fps, self.preset = Path(name), fps, preset
        self.host_frames: list[torch.Tensor] = []  # the chunks on the host, in order (the caller's frames)
        self._queue: queue.Queue[torch.Tensor | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tessera-encode", daemon=True)
        self._thread.start()

    def put(self, frames_THW3_uint8: torch.Tensor) -> None:
        self._queue.put(frames_THW3_uint8)

    def finish(self) -> EncodedVideo | None:
        """Wait for the encoder; the encoded video, or None (and no file) if it failed."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            log.warning("encoding while decoding failed (%s); the video is encoded after decoding instead",
                        self._error)
            _remove(self.path)
            return None
        return EncodedVideo(self.path, self.fps, self.preset)

    def _run(self) -> None:
        writer = None
        try:
            while (chunk := self._queue.get()) is not None:
                host = chunk.cpu()  # after the kernels that made it (same stream order); the GIL is released
                self.host_frames.append(host)
                if writer is None:
                    writer = _open_writer(self.path, self.fps, self.preset)
                for frame in _as_frames(host):
                    writer.append_data(frame)
            if writer is not None:
                writer.close()
                writer = None
        except BaseException as exc:  # noqa: BLE001 - reported by finish(); the frames still arrive
            self._error = exc
            while (chunk := self._queue.get()) is not None:
                self.host_frames.append(chunk.cpu())
        finally:
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()


def write_json_atomic(path: str | os.PathLike[str], obj: Any, overwrite: bool = False) -> Path:
    """Write `obj` as indented JSON (non-JSON values such as paths, dtypes, devices become strings)."""
    text = json.dumps(obj, indent=2, default=str) + "\n"

    def _write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return _write_atomic(path, overwrite, _write)


def write_latents_atomic(path: str | os.PathLike[str], latents: torch.Tensor, overwrite: bool = True) -> Path:
    """Save latents [B, C, F, H, W] as a safetensors file holding one float32 tensor named "latents"."""
    from safetensors.torch import save_file

    tensor = latents.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return _write_atomic(path, overwrite, lambda tmp: save_file({"latents": tensor}, str(tmp)))


def _write_atomic(path: str | os.PathLike[str], overwrite: bool, write: Callable[[Path], None]) -> Path:
    with _atomic_target(path, overwrite) as tmp:
        write(tmp)
    return Path(path)
