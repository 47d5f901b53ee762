"""Building a request-ready DiT (or a two-expert model's two) from the model family: weights, FP8, fast stages.

`build_experts` is what `Pipeline` calls once per load; the report's `weights` entry is what these return.
"""

from __future__ import annotations

import warnings

import torch
from tessera.attention import get_backend
from tessera.models.family import DiT
from tessera.models.fp8 import quantize_blocks_fp8_
from tessera.parallel import ParallelMesh
from tessera.runtime.config import GenerateConfig
from tessera.runtime.experts import EXPERT_NAMES, Experts
from tessera.runtime.preflight import choose_expert_offload

__all__ = ["RANDOM_WEIGHTS_SEED", "build_experts", "build_model", "compiles_stages", "note_missing_layer_weights"]

RANDOM_WEIGHTS_SEED = 0  # random-weight presets' weights, text encoder and preview decoder: part of the model


def compiles_stages(cfg: GenerateConfig) -> bool:
    """Whether the DiT's block stages are torch.compiled: `model.compile` (FP8's activation quantisation is fused
    into the Triton kernels that produce the activations, so `model.quant=fp8` needs no compile either)."""
    return cfg.model.compile


def build_model(
    cfg: GenerateConfig, family, model_cfg, device: torch.device, ckpt, expert: int = 0
) -> tuple[DiT, dict]:
    """The DiT on `device`, from `ckpt` (`cfg.model.path` resolved by `family`; None: seeded random weights);
    `expert` 1 is a two-expert model's low-noise one (random: seed + 1)."""
    model, load_info = family.build_dit(model_cfg, device, getattr(torch, cfg.model.dtype), ckpt, expert=expert,
                                        seed=RANDOM_WEIGHTS_SEED)
    if cfg.model.quant == "fp8":
        load_info["quant"] = quantize_blocks_fp8_(model).as_dict()
    load_info["parameter_bytes"] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if device.type == "cuda":  # Triton ops for the token-local elementwise work
        model.use_fast_stages(compile=compiles_stages(cfg))
    return model.eval(), load_info


def build_experts(cfg: GenerateConfig, family, model_cfg, mesh: ParallelMesh, ckpt) -> tuple[Experts, dict]:
    """The DiT, or both experts of a two-expert model (`model.boundary_ratio`), loaded one after the other; with
    `model.offload_experts` (or `auto` and a device too small for both) each waits in host memory once loaded.
    Returns them and the load report (two experts: the sum of their parameter bytes and one entry per expert)."""
    family.check_expert_config(cfg.model.boundary_ratio, ckpt)  # ValueError before any weight loads
    num_experts = 1 if cfg.model.boundary_ratio is None else 2
    offload, reason = choose_expert_offload(cfg, model_cfg, mesh.device, sp=mesh.sp_size, rank=mesh.rank)
    experts = Experts(mesh.device, offload=offload, offload_reason=reason)
    infos = []
    for index in range(num_experts):
        model, info = build_model(cfg, family, model_cfg, mesh.device, ckpt, expert=index)
        experts.add(model)
        infos.append({**info, "component": EXPERT_NAMES[index]} if num_experts > 1 else info)
    if num_experts == 1:
        return experts, infos[0]
    return experts, {**infos[0], "parameter_bytes": sum(info["parameter_bytes"] for info in infos), "experts": infos}


def note_missing_layer_weights(cfg: GenerateConfig, model: DiT, load_info: dict) -> None:
    """A backend with per-layer weights (SLA's proj_l) on a checkpoint without them runs with zeros: warn, naming
    them, and list them with the report's zero-initialised parameters."""
    if cfg.attention.backend == "auto":
        return  # auto never picks a backend with per-layer weights (their auto_problem)
    name = get_backend(cfg.attention.backend).layer_weight
    if name is None or getattr(model.blocks[0].attn1, name, None) is not None:
        return
    entry = f"blocks.*.attn1.{name}"
    warnings.warn(f"attention.backend={cfg.attention.backend}: the checkpoint has no {entry} weights, so that "
                  f"backend's {name} is zero in every block (its linear branch adds nothing). Use a checkpoint "
                  f"trained with attention.backend={cfg.attention.backend}.", stacklevel=3)
    load_info.setdefault("zero_initialised", []).append(entry)
