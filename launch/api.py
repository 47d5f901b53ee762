"""The Python API: load a model once, generate many videos. Same schema, validation and errors as the CLI.

    import tessera
    pipe = tessera.load(model={"preset": "wan-tiny"}, attention={"backend": "dense"})
    video = pipe.generate(prompt="a red fox in snow", seed=3, num_steps=4)
    video.frames   # numpy uint8 [F, H, W, 3] on rank 0 (None on the other ranks)
    video.latents  # torch.float32 [1, C, F', H', W'] (CPU), the final latents
    video.report   # dict, the JSON report
    video.save("out.mp4")  # mp4 + report beside it, atomic, same overwrite rules as the CLI
    pipe.generate(prompt="...", on_step=lambda step, num_steps: ...)  # after each step; may raise tessera.Cancelled
    pipe.generate(prompt="...", image="fox.png")  # image-to-video checkpoints: a path, a PIL image or a uint8 array

Keys are the CLI's (`--help`): groups as dicts, top-level keys as keywords. Keys given to `load` are defaults for
every request; `generate` takes the per-request ones (everything but `model.*` and `parallel.*`). SPMD under
torchrun: every rank makes the same calls; `load` joins the process group (and `close` leaves it) when torchrun
started the process and no group exists yet.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tessera.launch.config import resolve_config, resolve_launch, to_overrides
from tessera.runtime import build_mesh, destroy_process_group_safely, init_process_group_from_env
from tessera.runtime.config import GenerateConfig
from tessera.runtime.faults import NO_FAULTS, FaultPlan
from tessera.runtime.guards import Progress
from tessera.runtime.output import check_output_files
from tessera.runtime.pipeline import GenerateResult, Pipeline, write_outputs
from tessera.runtime.preflight import check_request_memory

__all__ = ["Video", "VideoPipeline", "load"]

LOAD_ONLY_GROUPS = ("model", "parallel")


def load(*, faults: FaultPlan = NO_FAULTS, **keys: Any) -> VideoPipeline:
    """Validate `keys` (ValueError/TypeError naming the key, as the CLI), join the process group under torchrun,
    load the weights and the text encoder, and return the pipeline. Nothing loads when a key is bad. `faults`:
    test-only fault injection for the load and every request (launch parses TESSERA_FAULT; runtime/faults.py)."""
    overrides = to_overrides(keys)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, model_cfg, ckpt = resolve_launch(overrides, world_size=world_size)  # the checkpoint, resolved once
    cfg.validate(world_size=world_size)
    owns_group = not dist.is_initialized()
    if owns_group:
        _, _, _, device = init_process_group_from_env(cfg.parallel.timeout_s)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        mesh = build_mesh(cfg=cfg.parallel.cfg, sp=cfg.parallel.sp, device=device)
        if cfg.model.memory_check:
            check_request_memory(cfg, model_cfg, device, sp=mesh.sp_size, rank=mesh.rank)
        pipe = Pipeline(cfg, model_cfg, mesh, faults=faults, checkpoint=ckpt)
        return VideoPipeline(pipe, overrides, world_size, owns_group, faults)
    except BaseException:
        if owns_group:
            destroy_process_group_safely()
        raise


class VideoPipeline:
    """A loaded model (see `load`). `generate(**keys)` -> `Video`; `close()` (or `with`) leaves the group."""

    def __init__(self, pipe: Pipeline, overrides: list[str], world_size: int, owns_group: bool,
                 faults: FaultPlan = NO_FAULTS) -> None:
        self._pipe, self._overrides, self._world_size, self._owns_group = pipe, overrides, world_size, owns_group
        self._faults, self._progress = faults, Progress()

    @property
    def config(self) -> GenerateConfig:
        """The resolved configuration of the load (the defaults of every request)."""
        return self._pipe.cfg

    def request_config(self, **keys: Any) -> GenerateConfig:
        """The validated configuration of one request (`load`'s keys, then these); no work is done. An `image` given
        as a PIL image or array is checked against the model here and left out of the config (`generate` passes it)."""
        keys, image = _image_object(keys)
        fixed = sorted({k.split(".")[0] for k in to_overrides(keys)} & set(LOAD_ONLY_GROUPS))
        if fixed:
            raise ValueError(f"{fixed[0]}.* is fixed when the pipeline loads; pass it to tessera.load(...) instead")
        cfg, _ = resolve_config([*self._overrides, *to_overrides(keys)], world_size=self._world_size,
                                checkpoint=self._pipe.checkpoint)
        cfg.validate(world_size=self._world_size)
        self._pipe.check_request(cfg, image_given=cfg.image is not None or image is not None)  # size, image
        return cfg

    @property
    def phase(self) -> str:
        """Where the current or last `generate` is or stopped: "config", "step N" (0-based) or "decode"."""
        return self._progress.phase

    def check(self, **keys: Any) -> GenerateConfig:
        """Validate one request on this rank without running it: its keys and values (`request_config`) and,
        unless `model.memory_check=false`, whether it fits beside the loaded weights on this rank's device.
        ValueError/TypeError naming the key and the fix; no collective."""
        cfg = self.request_config(**keys)
        self._check_memory(cfg)
        return cfg

    def generate(self, *, on_step: Callable[[int, int], None] | None = None, **keys: Any) -> Video:
        """One video: per-request keys as keywords (`prompt`, `seed`, `num_frames`, ..., `attention={...}`; `image`
        for image-to-video models: a path, a PIL image or a uint8 [H, W, 3] array, rank 0's being encoded).
        Bad keys raise ValueError/TypeError before any work, as in the CLI (a request that one rank's memory
        refuses is refused on every rank). `on_step(step, num_steps)` runs on every rank after each denoising
        step (0-based); raising `tessera.Cancelled` there stops the request at that step boundary,
        and under SP every rank must raise it after the same step."""
        cfg = self.request_config(**keys)
        self._check_memory_on_every_rank(cfg)
        self._progress = Progress()
        result = self._pipe.generate(cfg, image=_image_object(keys)[1], faults=self._faults, progress=self._progress,
                                     on_step=on_step)
        return Video(result, cfg, self._faults)

    def _check_memory(self, cfg: GenerateConfig) -> None:
        pipe = self._pipe
        if cfg.model.memory_check:  # the weights are loaded already: only the request's own memory must fit
            check_request_memory(cfg, pipe.model_cfg, pipe.mesh.device, sp=pipe.mesh.sp_size, rank=pipe.mesh.rank,
                                 already_loaded=pipe.load_info["parameter_bytes"], latents=pipe.latents)

    def _check_memory_on_every_rank(self, cfg: GenerateConfig) -> None:
        """`_check_memory` on every rank, agreed by one all_gather_object under torchrun: a request that one rank
        refuses (its device has less free memory) fails on all of them, naming that rank, instead of leaving the
        others waiting in the first collective."""
        world_size = self._pipe.mesh.world_size
        if world_size == 1 or not cfg.model.memory_check:
            self._check_memory(cfg)
            return
        error = None
        try:
            self._check_memory(cfg)
        except ValueError as err:
            error = str(err)
        errors: list[str | None] = [None] * world_size
        dist.all_gather_object(errors, error)
        refused = [(rank, message) for rank, message in enumerate(errors) if message]
        if refused:
            raise ValueError(f"rank {refused[0][0]}: {refused[0][1]}")

    def close(self) -> None:
        """Release the process group if `load` created it (the weights go with the object)."""
        if self._owns_group:
            destroy_process_group_safely()
            self._owns_group = False

    def __enter__(self) -> VideoPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _image_object(keys: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(keys, None) when `image` is absent or a path (made a str: the config key), else (keys without it, the image
    object: a PIL image or numpy array, which no config can hold)."""
    image = keys.get("image")
    if image is None or isinstance(image, str):
        return keys, None
    if isinstance(image, os.PathLike):
        return {**keys, "image": os.fspath(image)}, None
    return {k: v for k, v in keys.items() if k != "image"}, image


class Video:
    """One generated video: `frames` (numpy uint8 [F, H, W, 3] on rank 0, else None), `latents` (torch.float32
    [1, C, F', H', W'] on the CPU), `report` (the JSON report's dict); `save(path)` writes them."""

    def __init__(self, result: GenerateResult, cfg: GenerateConfig, faults: FaultPlan = NO_FAULTS) -> None:
        self._result, self._cfg, self._faults = result, cfg, faults
        self.frames: np.ndarray | None = None if result.frames is None else result.frames.numpy()
        self.latents: torch.Tensor = result.latents.float().cpu()
        self.report: dict = result.report

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False, save_latents: bool = False) -> Path | None:
        """Write the mp4 and its JSON report beside it (and `<stem>.latents.safetensors` with `save_latents`), all
        or none, on rank 0; an existing file is refused unless `overwrite` (as `output.overwrite`). Returns the
        video's path on rank 0, None on the other ranks."""
        if self.frames is None:
            return None
        check_output_files(path, save_latents, overwrite)
        output = replace(self._cfg.output, path=os.fspath(path), overwrite=overwrite, save_latents=save_latents)
        write_outputs(replace(self._cfg, output=output), self._result, self._faults)
        return Path(path)
