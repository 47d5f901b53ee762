"""Encoding the mp4 while the VAE decodes (runtime/output.py VideoEncodeStream, WanVAEDecoder.decode_streaming):
the same frames and the same file bytes as decoding first and then `write_video_atomic`, a failed encode falling
back to the usual write, and the pipeline using it on a real tiny diffusers checkpoint (CPU)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from tessera.runtime.output import VideoEncodeStream, write_video_atomic

pytest.importorskip("imageio.v2")


def _frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, size=(1, height, width, 3)).astype(np.int32)
    ramp = (np.arange(num_frames) * 17).reshape(-1, 1, 1, 1)
    return ((base // 2 + ramp) % 256).astype(np.uint8)


def _chunks(frames: np.ndarray) -> list[torch.Tensor]:
    """As the VAE hands them over: the first frame, then 4 at a time (with the batch dim)."""
    cuts = [0, 1, *range(5, len(frames) + 1, 4)]
    return [torch.from_numpy(frames[a:b])[None] for a, b in zip(cuts, cuts[1:], strict=False)]


def test_stream_writes_the_same_bytes_as_the_writer(tmp_path: Path) -> None:
    frames = _frames(13)
    stream = VideoEncodeStream(fps=24, preset="veryfast")
    for chunk in _chunks(frames):
        stream.put(chunk[0])
    encoded = stream.finish()
    assert encoded is not None and (encoded.fps, encoded.preset) == (24, "veryfast")
    assert np.array_equal(torch.cat(stream.host_frames).numpy(), frames)
    written = write_video_atomic(tmp_path / "after.mp4", frames, fps=24, preset="veryfast")
    copied = encoded.copy_atomic(tmp_path / "streamed.mp4")
    assert copied.read_bytes() == written.read_bytes()
    with pytest.raises(FileExistsError, match="output.overwrite=true"):
        encoded.copy_atomic(copied)
    encoded.copy_atomic(copied, overwrite=True)
    private = encoded.path
    assert private.is_file() and private.parent != tmp_path
    del encoded
    gc.collect()
    assert not private.exists()  # the private temp file goes with its object


def test_failed_encode_returns_none_and_keeps_the_frames() -> None:
    stream = VideoEncodeStream(fps=16, preset="veryfast")
    good = torch.from_numpy(_frames(5))
    stream.put(good[:1])
    stream.put(torch.zeros(4, 48, 64, 3, dtype=torch.float32))  # not uint8: the encoder refuses it
    stream.put(good[1:])
    assert stream.finish() is None
    assert not stream.path.exists()
    assert [t.shape[0] for t in stream.host_frames] == [1, 4, 4]  # every chunk still reached the host


def test_pipeline_encodes_while_decoding_on_one_rank(tmp_path: Path) -> None:
    import sys

    import tessera
    from tessera.models.wan.vae import WanVAEDecoder

    sys.path.insert(0, str(Path(__file__).parent))
    from _wan_checkpoint import write_diffusers_checkpoint

    ckpt = write_diffusers_checkpoint(tmp_path / "ckpt")
    request = dict(prompt="a red fox", seed=2, num_frames=9, height=32, width=48, num_steps=2)
    with tessera.load(model={"path": str(ckpt)}, attention={"backend": "dense"}) as pipe:
        video = pipe.generate(**request)
        assert video.report["video"]["encoded_while_decoding"] is True
        saved = video.save(tmp_path / "out.mp4")
        again = pipe.generate(**request, output={"fps": 24})
    # the frames are those of the one-piece decode of the same latents, bit for bit
    decoder = WanVAEDecoder(ckpt / "vae", device=torch.device("cpu"))
    expected = decoder.decode(video.latents)[0]
    assert torch.equal(torch.from_numpy(video.frames), expected)
    # and the file is the one the writer makes of them
    reference = write_video_atomic(tmp_path / "reference.mp4", video.frames, fps=16)
    assert saved.read_bytes() == reference.read_bytes()
    # a per-request fps is the stream's: saved as encoded, not re-encoded at the load's rate
    assert again.report["video"]["fps"] == 24 and again.report["video"]["encoded_while_decoding"] is True
    assert again._result.encoded.fps == 24
