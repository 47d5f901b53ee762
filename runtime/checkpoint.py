"""What `model.path` points at: a diffusers Wan2.1 directory, a native Wan2.1 directory or one safetensors file.

`resolve_checkpoint` reads only JSON files and safetensors headers (cheap, runs before any weight load) and says
where the DiT weights, the text encoder, tokenizer, VAE and scheduler settings live. `resolve_model` combines it
with the preset: the architecture comes from the checkpoint when it has a config; the preset supplies
generation defaults; an explicitly chosen preset whose architecture disagrees with the checkpoint is an error.
A diffusers checkpoint whose model_index.json names `WanDMDPipeline` (FastWan) defaults to the DMD sampler.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from tessera.models import WanConfig

__all__ = ["Checkpoint", "arch_mismatches", "resolve_checkpoint", "resolve_model"]

# Architecture fields compared between an explicit preset and a checkpoint config (gate_compress is not:
# VSA blocks get a zero-initialised gate when the checkpoint lacks one).
_ARCH_FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm",
)
_GATE_KEY = "to_gate_compress"  # diffusers attn1.to_gate_compress, native self_attn.to_gate_compress
DMD_PIPELINE_CLASS = "WanDMDPipeline"  # FastVideo's few-step distilled (FastWan) checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """Where each part of a checkpoint lives; `None` = the checkpoint does not carry that part."""

    path: Path
    kind: str  # "diffusers" | "native" | "file"
    weights: Path  # what `models.load_wan_weights_` reads: transformer/ dir, native dir or the file
    arch: dict[str, Any] | None  # WanConfig fields from the checkpoint's config, None for a bare file
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    vae: Path | None = None
    scheduler_config: dict[str, Any] | None = None
    pipeline_class: str | None = None  # model_index.json's `_class_name`, e.g. "WanPipeline", "WanDMDPipeline"

    @property
    def flow_shift(self) -> float | None:
        value = (self.scheduler_config or {}).get("flow_shift")
        return None if value is None else float(value)

    def missing_components(self) -> list[str]:
        """Sub-directories a real (non wan-tiny) run needs but this checkpoint lacks."""
        parts = (("text_encoder/", self.text_encoder), ("tokenizer/", self.tokenizer), ("vae/", self.vae))
        return [name for name, where in parts if where is None]


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """Classify `model.path` and locate its parts; ValueError naming model.path and what is missing."""
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"model.path={path} does not exist. Point model.path at a diffusers Wan2.1 directory, a native "
            f"Wan2.1 directory or one .safetensors file."
        )
    if path.is_file():
        if not path.name.endswith((".safetensors", ".safetensors.index.json")):
            raise ValueError(f"model.path={path} is a file but not a .safetensors file (or a safetensors index).")
        return Checkpoint(path=path, kind="file", weights=path, arch=None)
    if (path / "model_index.json").is_file() or (path / "transformer").is_dir():
        return _resolve_diffusers(path)
    if list(path.glob("*.safetensors")) or list(path.glob("*.safetensors.index.json")):
        return _resolve_native(path)
    raise ValueError(
        f"model.path={path} is a directory with neither model_index.json/transformer/ (diffusers format) nor "
        f"*.safetensors files (native Wan2.1 format). Point model.path at the checkpoint's root directory."
    )


def resolve_model(
    preset: str, preset_arch: dict[str, Any], preset_is_explicit: bool, path: str | Path | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture, checkpoint generation defaults) for a preset and an optional `model.path`.

    The checkpoint's config wins over the preset's architecture; with `preset_is_explicit` a disagreement is a
    ValueError naming both. Defaults: `flow_shift` from the diffusers scheduler config, when present; for a
    `WanDMDPipeline` checkpoint `scheduler=dmd` (whatever scheduler its model_index.json names: FastVideo samples
    these with DMD) and the attention backend its weights were trained with (see `_checkpoint_defaults`).
    """
    if path is None:
        return preset_arch, {}
    ckpt = resolve_checkpoint(path)
    if ckpt.arch is None:
        return preset_arch, {}
    if preset_is_explicit:
        diffs = arch_mismatches(preset_arch, ckpt.arch)
        if diffs:
            raise ValueError(
                f"model.preset={preset} does not match the architecture of model.path={path} "
                f"({'; '.join(diffs)}). Drop model.preset (the architecture is read from the checkpoint) or "
                f"choose the preset that matches."
            )
    # VSA runs still get a (zero-initialised) gate: the orchestrator adds it when the plan uses VSA.
    arch = dict(ckpt.arch)
    return arch, _checkpoint_defaults(ckpt)


def _checkpoint_defaults(ckpt: Checkpoint) -> dict[str, Any]:
    """Generation defaults a checkpoint implies. FastWan (DMD): the DMD sampler; VSA when the transformer carries
    `to_gate_compress` weights (trained with VSA; the sparsity comes from the fastwan presets), dense when not."""
    defaults: dict[str, Any] = {} if ckpt.flow_shift is None else {"flow_shift": ckpt.flow_shift}
    if ckpt.pipeline_class == DMD_PIPELINE_CLASS:
        gated = bool(ckpt.arch and ckpt.arch.get("gate_compress"))
        defaults.update(scheduler="dmd", attention={"backend": "vsa" if gated else "dense"})
    return defaults


def arch_mismatches(preset_arch: dict[str, Any], checkpoint_arch: dict[str, Any]) -> list[str]:
    """'key: preset X vs checkpoint Y' for every architecture field that differs (empty when they agree)."""
    return [
        f"{key}: preset {_norm(preset_arch[key])!r} vs checkpoint {_norm(checkpoint_arch[key])!r}"
        for key in _ARCH_FIELDS
        if key in preset_arch and _norm(preset_arch[key]) != _norm(checkpoint_arch[key])
    ]


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _read_json(file: Path, model_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"model.path={model_path}: cannot read {file} as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"model.path={model_path}: {file} must hold a JSON object")
    return data


def _has_gate_weights(weights_dir: Path) -> bool:
    """True when any safetensors header in `weights_dir` lists a VSA gate (diffusers or native name)."""
    for file in sorted(weights_dir.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                if any(_GATE_KEY in key for key in handle.keys()):
                    return True
        except Exception as err:  # SafetensorError for corrupt headers
            raise ValueError(f"cannot read safetensors file {file} (corrupt or truncated?): {err}") from err
    return False


def _resolve_diffusers(path: Path) -> Checkpoint:
    transformer = path / "transformer"
    missing = [name for name in ("transformer/config.json",) if not (path / name).is_file()]
    if not missing and not (list(transformer.glob("*.safetensors")) or list(transformer.glob("*.index.json"))):
        missing.append("transformer/*.safetensors")
    if missing:
        raise ValueError(
            f"model.path={path} looks like a diffusers checkpoint but lacks {', '.join(missing)}. "
            f"Download the complete checkpoint (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)."
        )
    config = _read_json(transformer / "config.json", path)
    try:
        arch = asdict(WanConfig.from_diffusers_config(config, gate_compress=_has_gate_weights(transformer)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.path={path}: transformer/config.json is not a Wan2.1 T2V config: {err}") from err
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    index_file = path / "model_index.json"
    pipeline_class = _read_json(index_file, path).get("_class_name") if index_file.is_file() else None
    return Checkpoint(
        path=path,
        kind="diffusers",
        weights=transformer,
        arch=arch,
        text_encoder=_dir_with(path / "text_encoder", "config.json"),
        tokenizer=_dir_with(path / "tokenizer", "tokenizer_config.json"),
        vae=_dir_with(path / "vae", "config.json"),
        scheduler_config=_read_json(scheduler_file, path) if scheduler_file.is_file() else None,
        pipeline_class=pipeline_class if isinstance(pipeline_class, str) else None,
    )


def _dir_with(folder: Path, marker: str) -> Path | None:
    return folder if (folder / marker).is_file() else None


def _resolve_native(path: Path) -> Checkpoint:
    """Native Wan2.1 directory: DiT safetensors (native names) and a config.json with native keys."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return Checkpoint(path=path, kind="native", weights=path, arch=None)
    config = _read_json(config_file, path)
    if config.get("model_type", "t2v") != "t2v":
        raise ValueError(
            f"model.path={path}: config.json has model_type={config['model_type']!r}; Tessera runs Wan2.1 T2V only."
        )
    try:
        dim, num_heads = int(config["dim"]), int(config["num_heads"])
        arch = asdict(
            WanConfig(
                num_attention_heads=num_heads,
                attention_head_dim=dim // num_heads,
                ffn_dim=int(config["ffn_dim"]),
                num_layers=int(config["num_layers"]),
                patch_size=tuple(config.get("patch_size", (1, 2, 2))),
                in_channels=int(config.get("in_dim", 16)),
                out_channels=int(config.get("out_dim", 16)),
                text_dim=int(config.get("text_dim", 4096)),
                freq_dim=int(config.get("freq_dim", 256)),
                cross_attn_norm=bool(config.get("cross_attn_norm", True)),
                eps=float(config.get("eps", 1e-6)),
                gate_compress=_has_gate_weights(path),
            )
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"model.path={path}: config.json is not a native Wan2.1 config ({err!r})") from err
    return Checkpoint(path=path, kind="native", weights=path, arch=arch)
