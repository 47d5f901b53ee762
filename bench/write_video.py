"""mp4 write time per x264 preset: `write_video_atomic` on smooth, video-like frames, with size and PSNR.

    python bench/write_video.py                           # 81 x 480 x 832; presets medium, fast, veryfast, ultrafast
    python bench/write_video.py --out write_video.json    # also the results as JSON
    python bench/write_video.py --presets superfast faster --frames 17 --height 128 --width 128 --iters 1

The frames are what a decoded Wan video looks like to an encoder, not white noise (which no preset compresses):
two drifting colour gradients, a bright disc crossing the frame, a slowly panning texture and mild per-frame grain.
Each preset writes through the runtime's own writer (libx264, yuv420p, crf `X264_CRF`, fsync and rename included),
median of --iters; the file is read back with imageio and compared with the source frames (PSNR over all RGB
pixels, in dB). The machine (CPU model, cores) is recorded: x264 spreads over the cores it finds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tessera.runtime.output import X264_CRF, write_video_atomic

PRESETS = ("medium", "fast", "veryfast", "ultrafast")  # medium: x264's default, what the writer used before
FPS = 16


def video_like_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [num_frames, height, width, 3]: moving gradients, a moving disc, a panning texture and light grain."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    texture = _smooth_noise(rng, height, 2 * width, cell=8)  # twice as wide: it pans by one width
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        phase = t / max(1, num_frames - 1)
        red = 0.5 + 0.4 * np.sin(2 * np.pi * (x + 0.3 * phase) + 3 * y)
        green = 0.5 + 0.4 * np.cos(2 * np.pi * (y - 0.5 * phase) + 2 * x)
        blue = 0.5 + 0.3 * np.sin(2 * np.pi * (x + y + phase))
        disc = ((x - 0.2 - 0.6 * phase) ** 2 * (width / height) ** 2 + (y - 0.5) ** 2 < 0.02).astype(np.float32)
        shift = int(phase * width)
        pan = 0.05 * texture[:, shift : shift + width]
        rgb = np.stack([red + 0.4 * disc, green + 0.4 * disc, blue - 0.3 * disc], axis=-1) + pan[..., None]
        rgb += 0.004 * rng.standard_normal((height, width, 1)).astype(np.float32)  # mild grain (1 level)
        frames[t] = (np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
    return frames


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """float32 [height, width], unit-scale noise with features about `cell` pixels wide (coarse noise, upsampled
    by repetition, then box-blurred over `cell` pixels along each axis)."""
    coarse = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
    fine = np.repeat(np.repeat(coarse, cell, 0), cell, 1)
    for axis in (0, 1):
        summed = np.cumsum(fine, axis=axis)
        fine = (np.take(summed, range(cell, summed.shape[axis]), axis) - np.take(summed, range(
            summed.shape[axis] - cell), axis)) / cell
    return fine[:height, :width] / fine.std()


def psnr_db(decoded: np.ndarray, source: np.ndarray) -> float:
    """PSNR in dB of uint8 `decoded` vs `source` (same shape), over every pixel and channel."""
    mse = np.mean((decoded.astype(np.float64) - source.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _read_back(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([frame for frame in reader])  # list(reader) would trust len(): inf
    finally:
        reader.close()


def measure(frames: np.ndarray, preset: str, iters: int, directory: Path) -> dict:
    """Median seconds of `iters` writes with `preset`, the file's size and bitrate, and its PSNR vs `frames`."""
    path, times = directory / f"{preset}.mp4", []
    for _ in range(iters):
        t0 = time.perf_counter()
        write_video_atomic(path, frames, fps=FPS, overwrite=True, preset=preset)
        times.append(time.perf_counter() - t0)
    size = path.stat().st_size
    decoded = _read_back(path)
    assert decoded.shape == frames.shape, (decoded.shape, frames.shape)
    return {"preset": preset, "seconds": statistics.median(times), "bytes": size,
            "kbit_per_s": size * 8 / 1000 / (frames.shape[0] / FPS), "psnr_db": psnr_db(decoded, frames)}


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "host": platform.node()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args()
    frames = video_like_frames(args.frames, args.height, args.width)
    with tempfile.TemporaryDirectory(prefix="tessera-write-bench-") as tmp:
        rows = [measure(frames, preset, args.iters, Path(tmp)) for preset in args.presets]
    result = {"machine": machine(), "shape": list(frames.shape), "fps": FPS, "crf": X264_CRF, "iters": args.iters,
              "results": rows}
    print(f"{args.frames} frames {args.height}x{args.width}, crf {X264_CRF}, median of {args.iters}; "
          f"{result['machine']['cpu']}, {result['machine']['cores']} cores")
    print(f"{'preset':<10} {'seconds':>8} {'MiB':>7} {'kbit/s':>8} {'PSNR dB':>8}")
    for row in rows:
        print(f"{row['preset']:<10} {row['seconds']:>8.2f} {row['bytes'] / 2**20:>7.2f} {row['kbit_per_s']:>8.0f} "
              f"{row['psnr_db']:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
