"""Memory pre-flight: estimate what one request needs on this rank and refuse it before any weight loads.

The estimate is a sum of the big, shape-determined buffers (weights, the forward's peak activations, a sparse
backend's reference on CPU, the decode), not a simulation: it exists to turn an impossible request
(`num_frames=100001 height=16384 width=16384`) into a clear error in seconds instead of an allocator traceback
minutes later. `model.memory_check=false` skips it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tessera.attention import get_backend
from tessera.models import family_for
from tessera.models.family import DEFAULT_LATENTS, LatentFormat, token_grid
from tessera.models.fp8 import check_quant_supported
from tessera.runtime.config import GenerateConfig
from tessera.runtime.output import check_output_files
from tessera.runtime.plan import build_attention_plan

__all__ = [
    "MemoryEstimate", "available_memory", "check_request_memory", "choose_expert_offload", "estimate_request_memory",
    "preflight_request",
]

_GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
# The VAE decoder (Wan's): 96 channels at full resolution, a causal chunk of 4 frames, about four live tensors of that
# size inside a residual block (input, two convs, the cache), in `model.vae_dtype`; frames come back as float32
# [3, T, H, W] whatever that dtype.
_VAE_FULL_RES_CHANNELS = 96
_VAE_LIVE_TENSORS = 4
_VAE_CHUNK_FRAMES = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs at its peak; the parts are reported in the error message."""

    weights: int
    activations: int
    text_encoder: int
    decode: int
    experts: int = 1  # DiT experts whose weights `weights` counts (two-expert models, both on the device: 2)

    @property
    def peak(self) -> int:
        # The text encoder is freed before the DiT loads, the DiT before rank 0 decodes.
        return max(self.text_encoder, self.weights + self.activations, self.decode)

    def describe(self) -> str:
        dit = "DiT weights" if self.experts == 1 else f"DiT weights ({self.experts} experts)"
        parts = ((dit, self.weights), ("activations", self.activations),
                 ("text encoder", self.text_encoder), ("decode", self.decode))
        return ", ".join(f"{name} {value / _GIB:.2f} GiB" for name, value in parts if value)


def estimate_request_memory(
    cfg: GenerateConfig, model_cfg, *, sp: int, rank: int, text_encoder_bytes: int = 0,
    resident_experts: int | None = None, latents: LatentFormat = DEFAULT_LATENTS,
) -> MemoryEstimate:
    """Per-rank estimate for `cfg` on a mesh with `sp` sequence-parallel ranks (this rank: `rank`), with
    `resident_experts` DiTs on the device (None: the fewest `cfg` allows, `fewest_resident_experts`); `latents`:
    the VAE's latent format (the token count follows its compression)."""
    dsize = _DTYPE_BYTES[cfg.model.dtype]
    experts = fewest_resident_experts(cfg) if resident_experts is None else resident_experts
    weights = experts * model_cfg.parameter_count() * dsize
    tokens = math.prod(token_grid(cfg.num_frames, cfg.height, cfg.width, model_cfg.patch_size, latents))
    local_tokens = math.ceil(tokens / sp)
    batch = 2 if cfg.guidance_scale != 1.0 and cfg.parallel.cfg == 1 else 1
    dim, heads = model_cfg.dim, model_cfg.num_attention_heads
    # Peak inside a block: the residual stream (fp32 in the modulation math), the FFN's wide activation,
    # q/k/v/gate and the two all-to-all buffers of the full sequence over this rank's heads.
    per_token = (model_cfg.ffn_dim + 8 * dim) * dsize + 2 * dim * 4
    activations = batch * local_tokens * per_token + batch * tokens * 8 * (dim // max(1, min(sp, heads))) * dsize
    backend = None if cfg.attention.backend == "auto" else get_backend(cfg.attention.backend)
    if backend is not None and backend.reference_bytes is not None and not torch.cuda.is_available():
        # Without a GPU a sparse backend runs its PyTorch reference, over the full sequence and this rank's heads
        # (VSA's materialises [B, N, S, S] scores); auto picks no sparse backend on a CPU.
        options = {key: getattr(cfg.attention, key) for key in backend.config_keys}
        activations += backend.reference_bytes(batch, math.ceil(heads / sp), tokens, dim // heads, **options)
    pixels = cfg.height * cfg.width
    decode = 0
    if cfg.model.path is not None:  # a real VAE: every rank decodes a block of rows (at least sp ranks)
        vae_bytes = _DTYPE_BYTES[cfg.model.vae_dtype]
        decode += _VAE_LIVE_TENSORS * _VAE_FULL_RES_CHANNELS * _VAE_CHUNK_FRAMES * pixels * vae_bytes // sp
        decode += (4 * 3 + 3) * cfg.num_frames * pixels // sp  # this rank's float and uint8 frames
    if rank == 0:  # gathers the whole video
        decode += 4 * 3 * cfg.num_frames * pixels + 3 * cfg.num_frames * pixels  # float frames + uint8 frames
    return MemoryEstimate(weights=weights, activations=activations, text_encoder=text_encoder_bytes,
                          decode=decode, experts=experts)


def fewest_resident_experts(cfg: GenerateConfig) -> int:
    """DiTs that must be on the device at once: 2 for a two-expert model with model.offload_experts=false, else 1
    (`auto` offloads when both do not fit: `choose_expert_offload`)."""
    two_experts = cfg.model.boundary_ratio is not None
    return 2 if two_experts and str(cfg.model.offload_experts).lower() == "false" else 1


def choose_expert_offload(
    cfg: GenerateConfig, model_cfg, device: torch.device, *, sp: int, rank: int
) -> tuple[bool, str]:
    """(whether the idle expert of a two-expert model waits in host memory, why) for the pipeline's load.

    model.offload_experts=auto offloads when this request's estimate with both experts on the device exceeds what
    the device has free now; never on a CPU device, whose "host memory" is the same memory."""
    if cfg.model.boundary_ratio is None:
        return False, "one expert"
    setting = str(cfg.model.offload_experts).lower()
    if setting != "auto":
        return setting == "true", f"model.offload_experts={setting}"
    if device.type != "cuda":
        return False, "model.offload_experts=auto: on the CPU the host memory is the device memory"
    both = estimate_request_memory(cfg, model_cfg, sp=sp, rank=rank, resident_experts=2)
    have, what = available_memory(device)
    fits = "fit" if both.peak <= have else "do not fit"
    return both.peak > have, (f"model.offload_experts=auto: both experts {fits} ({both.peak / _GIB:,.1f} GiB per "
                              f"rank: {both.describe()}; {what} {have / _GIB:,.1f} GiB)")


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what) this process may use: free device memory on CUDA, MemAvailable on the host otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {torch.cuda.get_device_name(device)} ({device})"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available host RAM (MemAvailable)"
    except OSError:
        pass
    pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * page_size), "available host RAM"


def check_request_memory(
    cfg: GenerateConfig, model_cfg, device: torch.device, *, sp: int, rank: int,
    ranks_sharing_device: int = 1, text_encoder_dir: Path | None = None, already_loaded: int = 0,
    latents: LatentFormat = DEFAULT_LATENTS,
) -> MemoryEstimate:
    """ValueError naming num_frames/height/width, the estimate and what the device has, when the request cannot
    fit; returns the estimate otherwise. `ranks_sharing_device`: ranks of this job on the same memory (CPU ranks
    of one host, or several ranks on one GPU). `already_loaded`: bytes of this request's weights that are resident
    already (a loaded pipeline), so not counted twice."""
    text_bytes = _safetensors_bytes(text_encoder_dir, _DTYPE_BYTES[cfg.model.dtype]) if text_encoder_dir else 0
    estimate = estimate_request_memory(cfg, model_cfg, sp=sp, rank=rank, text_encoder_bytes=text_bytes,
                                       latents=latents)
    have, what = available_memory(device)
    need = (estimate.peak - min(already_loaded, estimate.weights)) * ranks_sharing_device
    if need > have:
        shared = f" x {ranks_sharing_device} ranks on it" if ranks_sharing_device > 1 else ""
        raise ValueError(
            f"num_frames={cfg.num_frames} height={cfg.height} width={cfg.width} needs about "
            f"{estimate.peak / _GIB:,.1f} GiB per rank{shared} ({estimate.describe()}) but {what} is "
            f"{have / _GIB:,.1f} GiB. Lower num_frames, height or width, spread the tokens over more ranks "
            f"(parallel.sp){_offload_hint(estimate)}, or set model.memory_check=false to skip this estimate."
        )
    return estimate


def _offload_hint(estimate: MemoryEstimate) -> str:
    return ", keep the idle expert in host memory (model.offload_experts=true)" if estimate.experts > 1 else ""


def _safetensors_bytes(directory: Path, target_dtype_bytes: int) -> int:
    """Bytes of every floating tensor in `directory`'s safetensors files once loaded in the target dtype (read
    from the headers only)."""
    total = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            continue  # unreadable headers are reported by the loader, with the file named
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = math.prod(info["shape"])
            stored = _SAFETENSORS_BYTES.get(info["dtype"], 4)
            total += numel * (target_dtype_bytes if info["dtype"] in ("F32", "F16", "BF16") else stored)
    return total


def preflight_request(
    cfg: GenerateConfig, model_cfg, *, rank: int, device: torch.device, ranks_sharing_device: int = 1,
    checkpoint=None,
) -> MemoryEstimate | None:
    """Every check that needs no process group and no weights, on every rank: the output files can be created
    (a real temp file, not `os.access`), FP8 runs on `device` (`model.quant`), the attention plan builds (backend
    limits), and, unless `model.memory_check=false`, the request fits in memory. ValueError naming the key and the
    fix. `checkpoint`: `model.path` as the launch resolved it (else resolved here)."""
    check_output_files(cfg.output.path, cfg.output.save_latents, cfg.output.overwrite)
    check_quant_supported(cfg.model.quant, device)
    family = family_for(cfg.model.path, cfg.model.preset)
    ckpt = family.checkpoint_at(cfg.model.path, checkpoint)  # the launch's, when it passes it
    where = f"model.path={cfg.model.path}" if cfg.model.path else f"model.preset={cfg.model.preset}"
    family.check_request(ckpt, model_cfg, height=cfg.height, width=cfg.width, preset=cfg.model.preset,
                         image=cfg.image, where=where)  # the size, and an image for a model that takes one
    latents = family.latents(ckpt)  # the VAE's compression (e.g. 16x spatial for some VAEs)
    grid = token_grid(cfg.num_frames, cfg.height, cfg.width, model_cfg.patch_size, latents)
    build_attention_plan(cfg.attention, num_layers=model_cfg.num_layers, num_steps=cfg.num_steps,
                         grid_thw=grid, head_dim=model_cfg.attention_head_dim,
                         dtype=getattr(torch, cfg.model.dtype), device=device)  # backend limits: fail here
    if not cfg.model.memory_check:
        return None
    return check_request_memory(
        cfg, model_cfg, device, sp=cfg.parallel.sp, rank=rank, ranks_sharing_device=ranks_sharing_device,
        text_encoder_dir=None if ckpt is None else ckpt.text_encoder, latents=latents,
    )
