"""What the runtime tests compare after a run: the relative error of two tensors and the latents a CLI run saved
(`output.save_latents=true`); and the tiny CFG request the diffusers-parity tests make of a written checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

PROMPT, NEGATIVE = "a red fox running through   fresh snow", "blurry low quality"
RUN = dict(num_frames=9, height=32, width=48, num_steps=3, guidance_scale=5.0, seed=3)
ARGS = [f"{k}={v}" for k, v in RUN.items()] + [
    f"prompt={PROMPT}", f"negative_prompt={NEGATIVE}", "attention.backend=dense", "output.save_latents=true"
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def latents_of(out: Path) -> torch.Tensor:
    """The final latents saved beside the video `out` (`<stem>.latents.safetensors`)."""
    return load_file(str(out.with_suffix(".latents.safetensors")))["latents"]
