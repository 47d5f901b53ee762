"""The Wan family as the runtime sees it (`models.family.ModelFamily`): one object that answers everything
model-specific by delegating to this package's modules."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tessera.models.family import LatentFormat, TextEncoder
from tessera.models.wan import checkpoint as ckpt_mod
from tessera.models.wan import components
from tessera.models.wan.checkpoint import Checkpoint
from tessera.models.wan.config import WanConfig
from tessera.models.wan.image import ImageConditioningPlan, check_image_request, plan_image_conditioning
from tessera.models.wan.loading import load_wan_weights_
from tessera.models.wan.transformer import WanTransformer, build_wan_on_meta, materialize_random_

__all__ = ["WAN", "WanFamily"]

_PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline", ckpt_mod.DMD_PIPELINE_CLASS)


class WanFamily:
    """Wan2.1 T2V/I2V, Wan2.2 A14B and TI2V-5B, FastWan (DMD). The variants are told apart from the checkpoint's
    configs (`checkpoint.py`)."""

    name = "wan"
    presets = (
        "wan-tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "fastwan2.1-t2v-1.3b", "fastwan2.1-t2v-14b",
        "fastwan2.2-ti2v-5b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b",
    )
    random_weight_presets = ("wan-tiny",)  # random weights by design; the real architectures need a checkpoint

    # ---- checkpoint and architecture (JSON and safetensors headers only) ----

    def claims(self, path: Path) -> bool:
        """A diffusers directory whose model_index.json names a Wan pipeline or whose transformer is Wan's, a native
        Wan directory (config.json with `dim` and `num_heads`); not a bare weights file (the preset decides)."""
        for file, accepted in ((path / "model_index.json", _PIPELINE_CLASSES),
                               (path / "transformer" / "config.json", ("WanTransformer3DModel",))):
            if _json_object(file).get("_class_name") in accepted:
                return True
        return {"dim", "num_heads"} <= set(_json_object(path / "config.json"))

    resolve = staticmethod(ckpt_mod.resolve_checkpoint)
    checkpoint_at = staticmethod(ckpt_mod.checkpoint_at)
    resolve_model = staticmethod(ckpt_mod.resolve_model)
    arch_mismatches = staticmethod(ckpt_mod.arch_mismatches)
    check_expert_config = staticmethod(ckpt_mod.check_expert_config)
    check_checkpoint_request = staticmethod(ckpt_mod.check_checkpoint_request)  # the size and image vs the checkpoint

    def latents(self, ckpt: Checkpoint | None) -> LatentFormat:
        return ckpt_mod.checkpoint_latents(ckpt)

    def config(self, arch: dict[str, Any]) -> WanConfig:
        """The typed config of an arch dict (a preset's `arch:` or a checkpoint's config)."""
        return WanConfig(**arch)

    def with_gate(self, config: WanConfig) -> WanConfig:
        """`config` whose blocks carry the VSA gate (`to_gate_compress`: zero-initialised when the checkpoint lacks
        it)."""
        return config if config.gate_compress else dataclasses.replace(config, gate_compress=True)

    def arch(self, config: WanConfig) -> dict[str, Any]:
        return asdict(config)

    def image_optional(self, ckpt: Checkpoint | None, preset: str) -> bool:
        """Whether the model takes an image or none (Wan2.2 TI2V-5B)."""
        return ckpt_mod.starts_from_optional_image(ckpt, preset)

    def check_request(
        self, ckpt: Checkpoint | None, config: WanConfig, *, height: int, width: int, preset: str,
        image: str | None, where: str,
    ) -> None:
        """ValueError before any weight loads when a request does not fit: its size (the VAE's compression x the
        patch), or its image (`image`: its name, None without one; `where`: the model's key for the message)."""
        self.check_checkpoint_request(ckpt, height=height, width=width, preset=preset, image=image)
        check_image_request(config, image, where=where, image_optional=self.image_optional(ckpt, preset))

    # ---- weights and conditioning ----

    def build_dit(
        self, config: WanConfig, device: torch.device, dtype: torch.dtype, ckpt: Checkpoint | None, *, expert: int,
        seed: int,
    ) -> tuple[WanTransformer, dict]:
        """The DiT on `device` from `ckpt` (None: random weights from `seed + expert`); `expert` 1 is a two-expert
        model's low-noise one (transformer_2/). Returns it and the load report."""
        model = build_wan_on_meta(config)
        if ckpt is None:
            materialize_random_(model, seed=seed + expert, device=device, dtype=dtype)
            return model, {"weights": "random", "seed": seed + expert}
        weights = ckpt.weights if expert == 0 else ckpt.weights_2
        report = load_wan_weights_(model, weights, device=device, dtype=dtype)
        return model, {"weights": str(ckpt.path), "zero_initialised": list(report.zero_initialised)}

    def plan_conditioning(self, ckpt: Checkpoint | None, preset: str) -> components.ConditioningPlan:
        return components.plan_conditioning(ckpt, random_weights=preset in self.random_weight_presets)

    text_sequence_length = staticmethod(components.text_sequence_length)

    def build_text_encoder(
        self, plan: components.ConditioningPlan, text_dim: int, seed: int, device: torch.device, dtype: torch.dtype,
        show_progress: bool = True,
    ) -> TextEncoder:
        return components.build_text_encoder(plan, text_dim, seed, device, dtype, show_progress)

    def build_latent_decoder(
        self, plan: components.ConditioningPlan, seed: int, device: torch.device, show_progress: bool = True,
        split_rows: Callable[[int], Any] | None = None, dtype: torch.dtype = torch.float32,
    ):
        return components.build_latent_decoder(plan, seed, device, show_progress, split_rows, dtype)

    def plan_image(self, config: WanConfig, ckpt: Checkpoint | None, preset: str) -> ImageConditioningPlan | None:
        return plan_image_conditioning(config, ckpt, preset)


def _json_object(file: Path) -> dict:
    """The JSON object in `file`; {} when it is missing or not a JSON object (resolution reports those)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


WAN = WanFamily()
