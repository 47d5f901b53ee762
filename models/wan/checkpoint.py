"""What `model.path` points at: a diffusers Wan2.1 directory, a native Wan2.1 directory or one safetensors file.

`resolve_checkpoint` reads only JSON files and safetensors headers (cheap, runs before any weight load) and says
where the DiT weights, the text encoder, tokenizer, VAE, scheduler settings and (I2V) the CLIP image encoder and
its image processor live. `resolve_model` combines it with the preset: the architecture comes from the checkpoint
when it has a config; the preset supplies generation defaults; an explicitly chosen preset whose architecture
disagrees with the checkpoint is an error.
A diffusers checkpoint whose model_index.json names `WanDMDPipeline` (FastWan) defaults to the DMD sampler. One with
`transformer_2/` and a `boundary_ratio` in model_index.json carries a second, low-noise expert (Wan2.2 A14B). One with
the Wan2.2 VAE (vae/config.json: 48 latent channels, 16x spatial compression) or `expand_timesteps` in
model_index.json is a Wan2.2 TI2V-5B model (24 fps by default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from tessera.models.family import LatentFormat
from tessera.models.wan.conditioning import WAN21_LATENTS
from tessera.models.wan.config import WanConfig

__all__ = [
    "Checkpoint", "arch_mismatches", "check_checkpoint_request", "check_expert_config", "checkpoint_latents",
    "checkpoint_at", "resolve_checkpoint", "resolve_model", "starts_from_optional_image",
]

# Architecture fields compared between an explicit preset and a checkpoint config (gate_compress is not:
# VSA blocks get a zero-initialised gate when the checkpoint lacks one).
_ARCH_FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "image_dim", "added_kv_proj_dim",
)
_GATE_KEY = "to_gate_compress"  # diffusers attn1.to_gate_compress, native self_attn.to_gate_compress
_SLA_KEY = ".proj_l."  # SLA checkpoints: blocks.N.<attn1|self_attn>.<...>.proj_l.{weight,bias}
_EXTRA_WEIGHTS = {"gate_compress": _GATE_KEY, "sla_proj_l": _SLA_KEY}  # WanConfig field -> key marker in headers
DMD_PIPELINE_CLASS = "WanDMDPipeline"  # FastVideo's few-step distilled (FastWan) checkpoints
I2V_PIPELINE_CLASS = "WanImageToVideoPipeline"  # Wan2.1 I2V: with image_encoder/ (CLIP) and image_processor/
FASTWAN_TI2V_PRESET = "fastwan2.2-ti2v-5b"  # text-to-video only (FastVideo distilled it without image conditioning)
TI2V_FPS = 24  # Wan2.2 TI2V-5B's sample_fps (121 frames = 5 s); Wan2.1 and Wan2.2 A14B: the schema's 16


@dataclass(frozen=True)
class Checkpoint:
    """Where each part of a checkpoint lives; `None` = the checkpoint does not carry that part."""

    path: Path
    kind: str  # "diffusers" | "native" | "file"
    weights: Path  # what `load_wan_weights_` (loading.py) reads: transformer/ dir, native dir or the file
    arch: dict[str, Any] | None  # WanConfig fields from the checkpoint's config, None for a bare file
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    vae: Path | None = None
    scheduler_config: dict[str, Any] | None = None
    pipeline_class: str | None = None  # model_index.json's `_class_name`, e.g. "WanPipeline", "WanDMDPipeline"
    image_encoder: Path | None = None  # I2V: transformers CLIPVisionModel
    image_processor: Path | None = None  # I2V: CLIPImageProcessor (preprocessor_config.json)
    image_processor_class: str | None = None  # model_index.json's transformers class for image_processor/
    weights_2: Path | None = None  # two-expert (Wan2.2 A14B): transformer_2/, the low-noise expert's weights
    boundary_ratio: float | None = None  # two-expert: model_index.json's boundary_ratio (None: one expert)
    latents: LatentFormat = WAN21_LATENTS  # the VAE's latent channels and compression (vae/config.json)
    # model_index.json's `expand_timesteps` (Wan2.2 TI2V-5B): diffusers gives the DiT one timestep per token. For
    # text-to-video every token gets the same t, which the DiT's scalar-timestep path computes identically; from an
    # image, the first latent frame's tokens get 0 (the DiT's `clean_tokens` branch).
    expand_timesteps: bool = False

    @property
    def is_ti2v(self) -> bool:
        """A Wan2.2 TI2V-5B model (or its FastWan distillation): the Wan2.2 VAE or per-token timesteps."""
        return self.expand_timesteps or self.latents != WAN21_LATENTS

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


def checkpoint_at(path: str | Path | None, resolved: Checkpoint | None = None) -> Checkpoint | None:
    """The checkpoint at `path` (None: no path): `resolved` when it is that checkpoint already (resolved once per
    launch or loaded pipeline and passed down), else resolved now."""
    if path is None:
        return None
    if resolved is not None and resolved.path == Path(path):
        return resolved
    return resolve_checkpoint(path)


def resolve_model(
    preset: str, preset_arch: dict[str, Any], preset_is_explicit: bool, path: str | Path | None, *,
    preset_boundary_ratio: float | None = None, checkpoint: Checkpoint | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture, checkpoint generation defaults) for a preset and an optional `model.path`.

    The checkpoint's config wins over the preset's architecture; with `preset_is_explicit` a disagreement is a
    ValueError naming both. Defaults: `flow_shift` from the diffusers scheduler config, when present; for a
    `WanDMDPipeline` checkpoint `scheduler=dmd` (whatever scheduler its model_index.json names: FastVideo samples
    these with DMD) and the attention backend its weights were trained with (see `_checkpoint_defaults`); for a
    two-expert checkpoint `model.boundary_ratio`. The number of experts (a preset's `preset_boundary_ratio` set:
    two) is part of the architecture an explicit preset must match.
    """
    if path is None:
        return preset_arch, {}
    ckpt = checkpoint_at(path, checkpoint)
    if ckpt.arch is None:  # a bare file: the preset's architecture, with the extra weights its header shows
        sla_proj_l = _extra_weights(ckpt.weights)["sla_proj_l"]
        return {**preset_arch, "sla_proj_l": sla_proj_l}, _sla_defaults(sla_proj_l)
    if preset_is_explicit:
        diffs = arch_mismatches(preset_arch, ckpt.arch)
        experts = (1 if preset_boundary_ratio is None else 2, 1 if ckpt.weights_2 is None else 2)
        if experts[0] != experts[1]:
            diffs.append(f"experts: preset {experts[0]} vs checkpoint {experts[1]}")
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
    defaults.update(_sla_defaults(bool(ckpt.arch and ckpt.arch.get("sla_proj_l"))))
    if ckpt.boundary_ratio is not None:  # Wan2.2 A14B: transformer_2/ takes over below boundary_ratio x 1000
        defaults["model"] = {"boundary_ratio": ckpt.boundary_ratio}
    if ckpt.is_ti2v:
        defaults["output"] = {"fps": TI2V_FPS}
    return defaults


def _sla_defaults(sla_proj_l: bool) -> dict[str, Any]:
    """A checkpoint trained with SLA (it carries proj_l) runs SLA by default: its blocks never saw dense outputs."""
    return {"attention": {"backend": "sla"}} if sla_proj_l else {}


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


def _extra_weights(weights: Path) -> dict[str, bool]:
    """Which optional weights (`_EXTRA_WEIGHTS`: the VSA gate, SLA's proj_l) the safetensors headers in `weights`
    list: one file, an index (its shards lie beside it) or a directory; one pass over the headers."""
    if weights.is_file() and not weights.name.endswith(".safetensors"):
        weights = weights.parent
    files = [weights] if weights.is_file() else sorted(weights.glob("*.safetensors"))
    found = dict.fromkeys(_EXTRA_WEIGHTS, False)
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
        except Exception as err:  # SafetensorError for corrupt headers
            raise ValueError(f"cannot read safetensors file {file} (corrupt or truncated?): {err}") from err
        for field, marker in _EXTRA_WEIGHTS.items():
            found[field] = found[field] or any(marker in key for key in keys)
    return found


def _transformer_arch(path: Path, folder: Path, what: str) -> dict[str, Any]:
    """WanConfig fields of a diffusers transformer folder: its config.json plus the extra weights its headers list."""
    config = _read_json(folder / "config.json", path)
    try:
        return asdict(WanConfig.from_diffusers_config(config, **_extra_weights(folder)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.path={path}: {folder.name}/config.json is not a {what} config: {err}") from err


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
    arch = _transformer_arch(path, transformer, "Wan2.1 T2V/I2V")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    index_file = path / "model_index.json"
    index = _read_json(index_file, path) if index_file.is_file() else {}
    pipeline_class = index.get("_class_name")
    processor_entry = index.get("image_processor")  # ["transformers", "CLIPImageProcessor"]
    weights_2, boundary_ratio = _second_expert(path, arch, index)
    vae = _dir_with(path / "vae", "config.json")
    expand_timesteps = index.get("expand_timesteps", False)
    if not isinstance(expand_timesteps, bool):
        raise ValueError(f"model.path={path}: model_index.json has expand_timesteps={expand_timesteps!r}; it must be "
                         f"true (Wan2.2 TI2V-5B) or false. Fix: correct model_index.json.")
    return Checkpoint(
        path=path,
        kind="diffusers",
        weights=transformer,
        arch=arch,
        text_encoder=_dir_with(path / "text_encoder", "config.json"),
        tokenizer=_dir_with(path / "tokenizer", "tokenizer_config.json"),
        vae=vae,
        latents=_vae_latents(path, vae, arch),
        expand_timesteps=expand_timesteps,
        scheduler_config=_read_json(scheduler_file, path) if scheduler_file.is_file() else None,
        pipeline_class=pipeline_class if isinstance(pipeline_class, str) else None,
        weights_2=weights_2,
        boundary_ratio=boundary_ratio,
        image_encoder=_dir_with(path / "image_encoder", "config.json"),
        image_processor=_dir_with(path / "image_processor", "preprocessor_config.json"),
        image_processor_class=processor_entry[1] if isinstance(processor_entry, list) and len(processor_entry) == 2
        and isinstance(processor_entry[1], str) else None,
    )


def _second_expert(path: Path, arch: dict[str, Any], index: dict[str, Any]) -> tuple[Path | None, float | None]:
    """(transformer_2/, boundary_ratio) of a two-expert checkpoint (Wan2.2 A14B), (None, None) for one expert.

    diffusers' WanPipeline switches to `transformer_2` (the low-noise expert) below boundary_ratio x 1000, so the
    directory and model_index.json's `boundary_ratio` come together; either alone, a ratio outside (0, 1) or two
    experts of different architectures is a ValueError naming the file and the fix."""
    folder, ratio, index_file = path / "transformer_2", index.get("boundary_ratio"), path / "model_index.json"
    if ratio is None and not folder.is_dir():
        return None, None
    if ratio is None:
        raise ValueError(
            f"model.path={path} has transformer_2/ (a second, low-noise expert) but {index_file} sets no "
            f"boundary_ratio, so when to switch experts is unknown. Fix: add \"boundary_ratio\": 0.875 (Wan2.2 "
            f"T2V-A14B's) to model_index.json, or remove transformer_2/ to run transformer/ alone."
        )
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise ValueError(
            f"model.path={path}: {index_file} sets boundary_ratio={ratio!r} (a two-expert model) but "
            f"transformer_2/config.json or transformer_2/*.safetensors is missing. Fix: download the complete "
            f"checkpoint (e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers), or set boundary_ratio to null for one expert."
        )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"model.path={path}: {index_file} has boundary_ratio={ratio!r}; it must lie in (0, 1). "
                         f"Fix: e.g. 0.875 (Wan2.2 T2V-A14B's).")
    arch_2 = _transformer_arch(path, folder, "Wan")
    diffs = [f"{key}: transformer/ {arch[key]!r} vs transformer_2/ {arch_2[key]!r}"
             for key in arch if _norm(arch[key]) != _norm(arch_2[key])]
    if diffs:
        raise ValueError(f"model.path={path}: the two experts differ ({'; '.join(diffs)}); Tessera runs two experts "
                         f"of one architecture (Wan2.2 A14B). Fix: pair transformer/ with a transformer_2/ of the "
                         f"same architecture (and the same extra weights).")
    return folder, float(ratio)


def _vae_latents(path: Path, vae: Path | None, arch: dict[str, Any]) -> LatentFormat:
    """The latent format of vae/config.json (Wan2.1's without a vae/: its absence is reported where it is needed);
    ValueError naming the file when it is not a Wan VAE this runtime runs, or does not fit the DiT."""
    if vae is None:
        return WAN21_LATENTS
    config = _read_json(vae / "config.json", path)
    try:
        latents = LatentFormat(channels=int(config.get("z_dim") or 16),
                               spatial_stride=int(config.get("scale_factor_spatial") or 8),
                               temporal_stride=int(config.get("scale_factor_temporal") or 4))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.path={path}: vae/config.json is not a Wan VAE config ({err})") from err
    if latents.temporal_stride != WAN21_LATENTS.temporal_stride or latents.spatial_stride not in (8, 16):
        raise ValueError(
            f"model.path={path}: vae/config.json has scale_factor_temporal={latents.temporal_stride} and "
            f"scale_factor_spatial={latents.spatial_stride}; Tessera runs the Wan2.1 VAE (4, 8) and the Wan2.2 VAE "
            f"(4, 16). Fix: use a Wan checkpoint's vae/."
        )
    if arch["out_channels"] != latents.channels:
        raise ValueError(
            f"model.path={path}: transformer/config.json has out_channels={arch['out_channels']} but the VAE's "
            f"latents have z_dim={latents.channels} channels: transformer/ and vae/ come from different models. Fix: "
            f"pair them as in the original checkpoint (Wan2.1: 16, Wan2.2 TI2V-5B: 48)."
        )
    return latents


def checkpoint_latents(ckpt: Checkpoint | None) -> LatentFormat:
    """The latent format a run samples in: the checkpoint VAE's, Wan2.1's without a checkpoint (wan-tiny)."""
    return WAN21_LATENTS if ckpt is None else ckpt.latents


def starts_from_optional_image(ckpt: Checkpoint | None, preset: str) -> bool:
    """Whether the checkpoint is Wan2.2 TI2V-5B, which runs text-to-video and, given an image, image-to-video (the
    image's latents as the clean first latent frame): not its FastWan distillation, which is text-to-video only."""
    return ckpt is not None and ckpt.is_ti2v and not _is_fastwan_ti2v(ckpt, preset)


def _is_fastwan_ti2v(ckpt: Checkpoint, preset: str) -> bool:
    return ckpt.pipeline_class == DMD_PIPELINE_CLASS or preset == FASTWAN_TI2V_PRESET


def check_checkpoint_request(
    ckpt: Checkpoint | None, *, height: int, width: int, preset: str, image: str | None
) -> None:
    """ValueError, before any weight loads, when a request does not fit the checkpoint's family: a size that the
    VAE's compression x the DiT's patch does not divide (32 pixels for Wan2.2 TI2V-5B), or an image (`image`: its
    name, None without one) for FastWan2.2-TI2V-5B (distilled for text-to-video only; the base TI2V-5B takes one)."""
    if ckpt is None:
        return
    patch = tuple((ckpt.arch or {}).get("patch_size", (1, 2, 2)))
    for key, axis, value in (("height", 1, height), ("width", 2, width)):
        multiple = ckpt.latents.spatial_stride * patch[axis]
        if value % multiple:
            raise ValueError(
                f"{key}={value} must be a multiple of {multiple} for model.path={ckpt.path}: its VAE compresses "
                f"{ckpt.latents.spatial_stride}x spatially and the DiT's patches are {patch[axis]} latent pixels. "
                f"Fix: {key}={max(multiple, multiple * round(value / multiple))}."
            )
    if image is not None and ckpt.is_ti2v and _is_fastwan_ti2v(ckpt, preset):
        raise ValueError(
            f"image={image} was given but model.path={ckpt.path} is FastWan2.2-TI2V-5B "
            f"(the DMD sampler), which is distilled for text-to-video only. Fix: drop image, or load the base "
            f"Wan-AI/Wan2.2-TI2V-5B-Diffusers, which starts a video from an image."
        )


def check_expert_config(boundary_ratio: float | None, ckpt: Checkpoint | None) -> None:
    """ValueError unless `model.boundary_ratio` and the resolved checkpoint agree on a second expert (with no
    checkpoint, random weights: a ratio asks for two random experts)."""
    if ckpt is None:
        return
    path = ckpt.path
    if boundary_ratio is not None and ckpt.weights_2 is None:
        raise ValueError(
            f"model.boundary_ratio={boundary_ratio} asks for a second (low-noise) expert but model.path={path} has "
            f"one (no transformer_2/ with a boundary_ratio in model_index.json). Fix: drop model.boundary_ratio (a "
            f"preset such as wan2.2-t2v-a14b sets it: choose a one-expert preset), or load a Wan2.2 A14B checkpoint."
        )
    if boundary_ratio is None and ckpt.weights_2 is not None:
        raise ValueError(
            f"model.boundary_ratio=null but model.path={path} has two experts (transformer/ and transformer_2/, "
            f"boundary_ratio={ckpt.boundary_ratio} in model_index.json). Fix: drop model.boundary_ratio=null (the "
            f"checkpoint's ratio applies), or set it to a value in (0, 1)."
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
            f"model.path={path}: config.json has model_type={config['model_type']!r}; Tessera runs native Wan2.1 "
            f"T2V directories only. For image-to-video use the diffusers layout (e.g. "
            f"Wan-AI/Wan2.1-I2V-14B-480P-Diffusers: its image_encoder/ and image_processor/ are loaded)."
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
                **_extra_weights(path),
            )
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"model.path={path}: config.json is not a native Wan2.1 config ({err!r})") from err
    return Checkpoint(path=path, kind="native", weights=path, arch=arch)
