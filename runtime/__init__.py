"""Tessera runtime: typed config, attention plan, per-request state and the denoising orchestrator."""

from parallel import build_mesh, destroy_process_group_safely, init_process_group_from_env
from runtime.config import PRESETS, AttentionConfig, GenerateConfig, ModelConfig, OutputConfig, ParallelConfig
from runtime.pipeline import GenerateResult, generate
from runtime.plan import AttentionPlan, build_attention_plan

__all__ = [
    "PRESETS",
    "AttentionConfig",
    "AttentionPlan",
    "GenerateConfig",
    "GenerateResult",
    "ModelConfig",
    "OutputConfig",
    "ParallelConfig",
    "build_attention_plan",
    "build_mesh",
    "destroy_process_group_safely",
    "generate",
    "init_process_group_from_env",
]
