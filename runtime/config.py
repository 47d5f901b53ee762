"""Typed, frozen run configuration: pure data that validates itself.

`launch/` turns YAML presets + dotlist overrides into a `GenerateConfig`; nothing below launch sees OmegaConf.
Every user error is a ValueError/TypeError that names the key, the bad value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESETS = ("wan-tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
# Presets whose weights are random by design; the real architectures need a checkpoint.
RANDOM_WEIGHT_PRESETS = ("wan-tiny",)
DTYPES = ("float32", "bfloat16")
SCHEDULERS = ("unipc", "euler")
BACKENDS = ("dense", "vsa", "auto")
CUDA_GRAPHS = ("auto", "true", "false")  # OmegaConf turns true/on into "True": compared lower-cased


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    preset: str = "wan-tiny"
    path: str | None = None
    dtype: str = "float32"
    # Replay each step's DiT forward from a CUDA graph (runtime/graphs.py): "auto" (on CUDA with one rank, only
    # the step plans a timed forward finds host-paced), "true" (always, also under SP / CFG-parallel, capturing
    # the NCCL collectives), "false".
    cuda_graphs: str = "auto"


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    sp: int = 1
    cfg: int = 1
    # Every collective fails after this long instead of hanging on a dead or stuck peer rank.
    timeout_s: float = 600.0


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    backend: str = "auto"
    # A float, or a list with one value per denoising step. VSA default 0.9, never a silent 0.
    sparsity: Any = 0.9
    dense_blocks: list[int] = field(default_factory=list)
    dense_steps: int = 0


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    path: str = "outputs/video.mp4"
    overwrite: bool = False
    save_latents: bool = False


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    prompt: str = "a red fox running through fresh snow, cinematic lighting"
    negative_prompt: str = ""
    seed: int = 0
    num_frames: int = 17
    height: int = 128
    width: int = 128
    num_steps: int = 8
    guidance_scale: float = 5.0
    flow_shift: float = 3.0
    scheduler: str = "unipc"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Raise ValueError/TypeError naming the first bad key; cheap, runs before any weight load."""
        _check_type("seed", self.seed, int)
        if self.num_frames < 1 or (self.num_frames - 1) % 4 != 0:
            raise ValueError(
                f"num_frames={self.num_frames} must be 4k+1 (e.g. 17, 33, 81): the Wan VAE packs 4 frames per "
                f"latent frame after the first. Try num_frames={max(1, 4 * round((self.num_frames - 1) / 4) + 1)}."
            )
        for key in ("height", "width"):
            value = getattr(self, key)
            if value <= 0 or value % 16 != 0:
                raise ValueError(
                    f"{key}={value} must be a positive multiple of 16 (VAE stride 8 x patch 2). "
                    f"Try {key}={max(16, 16 * round(value / 16))}."
                )
        if self.num_steps <= 0:
            raise ValueError(f"num_steps={self.num_steps} must be a positive integer, e.g. num_steps=50.")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be a finite number >= 0 (1 = no CFG).")
        if not math.isfinite(self.flow_shift) or self.flow_shift <= 0:
            raise ValueError(f"flow_shift={self.flow_shift} must be > 0 (Wan uses 3.0 at 480p, 5.0 at 720p).")
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("model.preset", self.model.preset, PRESETS)
        _check_choice("model.dtype", self.model.dtype, DTYPES)
        _check_choice("model.cuda_graphs", str(self.model.cuda_graphs).lower(), CUDA_GRAPHS)
        if self.model.path is None and self.model.preset not in RANDOM_WEIGHT_PRESETS:
            raise ValueError(
                f"model.path is missing: preset {self.model.preset!r} needs a local checkpoint. "
                f"Set model.path=/path/to/checkpoint, or use model.preset=wan-tiny (random weights)."
            )
        if self.model.path is not None and not Path(self.model.path).exists():
            raise ValueError(
                f"model.path={self.model.path} does not exist. Point model.path at a local checkpoint "
                f"(a diffusers directory, a directory of .safetensors files, or one .safetensors file)."
            )
        self._validate_parallel(world_size)
        self._validate_attention()

    def _validate_parallel(self, world_size: int | None) -> None:
        par = self.parallel
        if par.cfg not in (1, 2):
            raise ValueError(f"parallel.cfg={par.cfg} must be 1 (batched CFG) or 2 (CFG split over 2 ranks).")
        if par.sp < 1:
            raise ValueError(f"parallel.sp={par.sp} must be >= 1.")
        if not math.isfinite(par.timeout_s) or par.timeout_s <= 0:
            raise ValueError(
                f"parallel.timeout_s={par.timeout_s} must be > 0 seconds (collective timeout), e.g. 600."
            )
        if par.cfg == 2 and self.guidance_scale == 1.0:
            raise ValueError(
                "parallel.cfg=2 needs classifier-free guidance: set guidance_scale != 1 or parallel.cfg=1."
            )
        if world_size is not None and par.sp * par.cfg != world_size:
            raise ValueError(
                f"parallel.sp * parallel.cfg = {par.sp} * {par.cfg} = {par.sp * par.cfg} but the world size is "
                f"{world_size}. Set parallel.sp={world_size // par.cfg if world_size % par.cfg == 0 else world_size} "
                f"(and parallel.cfg accordingly) or launch with --nproc_per_node={par.sp * par.cfg}."
            )

    def _validate_attention(self) -> None:
        att = self.attention
        _check_choice("attention.backend", att.backend, BACKENDS)
        schedule = sparsity_schedule(att.sparsity, self.num_steps)
        for value in schedule:
            if not 0.0 <= value < 1.0:
                raise ValueError(
                    f"attention.sparsity={att.sparsity} must lie in [0, 1) (fraction of key tiles skipped), "
                    f"e.g. attention.sparsity=0.9."
                )
        if att.dense_steps < 0:
            raise ValueError(f"attention.dense_steps={att.dense_steps} must be >= 0.")
        for block in att.dense_blocks:
            _check_type("attention.dense_blocks", block, int)


def sparsity_schedule(sparsity: Any, num_steps: int) -> tuple[float, ...]:
    """One sparsity per step from a float or a per-step list; TypeError/ValueError naming the key."""
    if isinstance(sparsity, bool):
        raise TypeError(f"attention.sparsity={sparsity!r} must be a number in [0, 1) or a list of them.")
    if isinstance(sparsity, (int, float)):
        return (float(sparsity),) * num_steps
    if isinstance(sparsity, (list, tuple)):
        if len(sparsity) != num_steps:
            raise ValueError(
                f"attention.sparsity has {len(sparsity)} entries but num_steps={num_steps}: "
                f"give one value per step, or a single number."
            )
        for value in sparsity:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"attention.sparsity entry {value!r} must be a number in [0, 1).")
        return tuple(float(v) for v in sparsity)
    raise TypeError(f"attention.sparsity={sparsity!r} must be a number in [0, 1) or a list of them.")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}. Set {key}=<one of those>.")


def _check_type(key: str, value: Any, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{key}={value!r} must be of type {kind.__name__}.")
