"""Atomic writers: real mp4 round trip, refusal of existing files, no leftovers on failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tessera.runtime.output as output
import torch
from tessera.launch.config import resolve_config
from tessera.runtime.config import DEFAULT_ENCODER_PRESET, ENCODER_PRESETS
from tessera.runtime.output import check_output_path, write_json_atomic, write_latents_atomic, write_video_atomic

imageio = pytest.importorskip("imageio.v2")


def _frames(num_frames: int = 5, height: int = 64, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(1, height, width, 3), dtype=np.uint8)
    # Smooth-ish content plus a per-frame brightness ramp, so frames differ.
    ramp = (np.arange(num_frames, dtype=np.int32) * 20).reshape(-1, 1, 1, 1)
    return ((base.astype(np.int32) // 2 + ramp) % 256).astype(np.uint8)


def _read_video(path: Path) -> np.ndarray:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([frame for frame in reader])
    finally:
        reader.close()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_video_round_trip(tmp_path: Path) -> None:
    frames = _frames(9, 64, 48)
    out = write_video_atomic(tmp_path / "clip.mp4", torch.from_numpy(frames), fps=16)
    assert out == tmp_path / "clip.mp4" and out.stat().st_size > 0
    back = _read_video(out)
    assert back.shape == frames.shape
    assert np.abs(back.astype(np.int32).mean((1, 2, 3)) - frames.astype(np.int32).mean((1, 2, 3))).max() < 8
    assert _leftovers(tmp_path) == []


def test_odd_sizes_are_padded(tmp_path: Path) -> None:
    back = _read_video(write_video_atomic(tmp_path / "odd.mp4", _frames(3, 33, 17)))
    assert back.shape == (3, 34, 18, 3)


def test_existing_file_refused_then_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "v.mp4"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="output.overwrite=true"):
        write_video_atomic(target, _frames())
    assert target.read_bytes() == b"keep me" and _leftovers(tmp_path) == []
    write_video_atomic(target, _frames(), overwrite=True)
    assert _read_video(target).shape == (5, 64, 64, 3)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 8, 8, 3), np.float32),
        np.zeros((2, 8, 8), np.uint8),
        torch.zeros(2, 8, 8, 3),
        np.zeros((0, 8, 8, 3), np.uint8),
    ],
)
def test_bad_frames_leave_nothing(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="frames"):
        write_video_atomic(tmp_path / "bad.mp4", bad)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "crash.mp4"
    seen: list[Path] = []

    def failing_encode(tmp: Path, frames: np.ndarray, fps: int, preset: str) -> None:
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.name.startswith(".crash.tmp-") and tmp.suffix == ".mp4"
        real_encode(tmp, frames[:2], fps, preset)  # a real partial file exists now
        assert tmp.stat().st_size > 0
        raise RuntimeError("disk full")

    real_encode = output._encode_video
    monkeypatch.setattr(output, "_encode_video", failing_encode)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video_atomic(target, _frames())
    assert seen and list(tmp_path.iterdir()) == []


def test_existing_file_survives_failed_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "v.mp4"
    target.write_bytes(b"old")

    def failing_encode(tmp: Path, frames: np.ndarray, fps: int, preset: str) -> None:
        raise OSError("encoder died")

    monkeypatch.setattr(output, "_encode_video", failing_encode)
    with pytest.raises(OSError, match="encoder died"):
        write_video_atomic(target, _frames(), overwrite=True)
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


# What x264 writes into every stream (an SEI message listing its options): each preset's own motion search settings.
X264_OPTIONS = {"ultrafast": "subme=0", "veryfast": "subme=2", "medium": "subme=7"}


@pytest.mark.parametrize("preset", list(X264_OPTIONS))
def test_encoder_preset_reaches_x264(tmp_path: Path, preset: str) -> None:
    frames = _frames(9, 64, 48)
    out = write_video_atomic(tmp_path / f"{preset}.mp4", frames, preset=preset)
    options = out.read_bytes().split(b"options: ", 1)[1].split(b"\x00", 1)[0].decode()
    assert X264_OPTIONS[preset] in options.split() and "crf=23.0" in options.split(), options
    assert _read_video(out).shape == frames.shape  # and the file plays back


def test_default_encoder_preset_is_the_config_default(tmp_path: Path) -> None:
    assert resolve_config([])[0].output.encoder_preset == DEFAULT_ENCODER_PRESET == "veryfast"
    out = write_video_atomic(tmp_path / "default.mp4", _frames())
    assert b" subme=2 " in out.read_bytes()  # veryfast's


def test_bad_encoder_preset_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_encode(*args: object) -> None:
        raise AssertionError("the encoder ran")

    monkeypatch.setattr(output, "_encode_video", no_encode)
    with pytest.raises(ValueError, match=r"output\.encoder_preset='turbo' is not an x264 preset\. Fix: set "
                       r"output\.encoder_preset to one of ultrafast, "):
        write_video_atomic(tmp_path / "v.mp4", _frames(), preset="turbo")
    assert list(tmp_path.iterdir()) == []
    cfg, _ = resolve_config(["output.encoder_preset=turbo"])  # the config says so before anything loads
    with pytest.raises(ValueError, match=r"output\.encoder_preset='turbo' is not one of ultrafast, .*placebo"):
        cfg.validate()
    assert resolve_config(["output.encoder_preset=medium"])[0].output.encoder_preset in ENCODER_PRESETS


def test_json_round_trip(tmp_path: Path) -> None:
    report = {"steps": [0.1, 0.2], "device": torch.device("cpu"), "path": tmp_path, "name": "x"}
    path = write_json_atomic(tmp_path / "r.json", report)
    loaded = json.loads(path.read_text())
    assert loaded == {"steps": [0.1, 0.2], "device": "cpu", "path": str(tmp_path), "name": "x"}
    with pytest.raises(FileExistsError, match="output.overwrite=true"):
        write_json_atomic(path, {"other": 1})
    write_json_atomic(path, {"other": 1}, overwrite=True)
    assert json.loads(path.read_text()) == {"other": 1}
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "bad.json", {1j: 2})  # complex keys are not JSON
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_latents_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    latents = torch.randn(1, 16, 2, 3, 5, dtype=torch.float64)
    path = write_latents_atomic(tmp_path / "sub" / "x.latents.safetensors", latents)
    loaded = load_file(str(path))
    assert list(loaded) == ["latents"] and loaded["latents"].dtype == torch.float32
    assert torch.equal(loaded["latents"], latents.float())
    with pytest.raises(FileExistsError):
        write_latents_atomic(path, latents, overwrite=False)


def test_check_output_path(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "a.mp4", overwrite=False) == tmp_path / "a.mp4"
    assert check_output_path(tmp_path / "new" / "dir" / "a.mp4", overwrite=False)  # parents get created
    (tmp_path / "a.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match="output.overwrite"):
        check_output_path(tmp_path / "a.mp4", overwrite=False)
    check_output_path(tmp_path / "a.mp4", overwrite=True)
    with pytest.raises(ValueError, match="output.path"):
        check_output_path(tmp_path / "a.txt", overwrite=True)
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ValueError, match="output.path.*directory"):
        check_output_path(tmp_path / "d.mp4", overwrite=True)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="output.path.*not a directory"):
        check_output_path(tmp_path / "file" / "a.mp4", overwrite=False)
    assert (tmp_path / "a.mp4").read_bytes() == b"x"


def test_default_output_is_a_new_numbered_file_per_run(tmp_path, monkeypatch):
    from tessera.launch.generate import main
    from tessera.runtime.output import next_numbered_path

    monkeypatch.chdir(tmp_path)
    assert next_numbered_path() == Path("outputs/video-001.mp4")
    small = ["num_frames=5", "height=32", "width=32", "num_steps=1"]
    assert main(small) == 0 and main(small) == 0  # the README's first command, twice in a row
    names = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert names == ["video-001.json", "video-001.mp4", "video-002.json", "video-002.mp4"]
    (tmp_path / "outputs" / "video-007.latents.safetensors").touch()  # any file of a number takes it
    assert next_numbered_path() == Path("outputs/video-008.mp4")
    assert main([*small, "output.path=outputs/video-001.mp4"]) == 2  # an explicit existing path is still refused
