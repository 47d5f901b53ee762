"""Tessera runtime: typed config, attention plan, per-request state and the denoising orchestrator."""

from tessera.models import family_for
from tessera.parallel import build_mesh, destroy_process_group_safely, init_process_group_from_env
from tessera.runtime.config import PRESETS, AttentionConfig, GenerateConfig, ModelConfig, OutputConfig, ParallelConfig
from tessera.runtime.pipeline import GenerateResult, Pipeline, generate, generate_many, write_outputs
from tessera.runtime.plan import AttentionPlan, build_attention_plan

__all__ = [
    "PRESETS",
    "AttentionConfig",
    "AttentionPlan",
    "GenerateConfig",
    "GenerateResult",
    "Pipeline",
    "ModelConfig",
    "OutputConfig",
    "ParallelConfig",
    "build_attention_plan",
    "family_for",
    "build_mesh",
    "destroy_process_group_safely",
    "generate",
    "generate_many",
    "init_process_group_from_env",
    "write_outputs",
]
