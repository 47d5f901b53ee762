"""Typed, frozen run configuration: pure data that validates itself.

`launch/` turns YAML presets + dotlist overrides into a `GenerateConfig`; nothing below launch sees OmegaConf.
Every user error is a ValueError/TypeError that names the key, the bad value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from tessera.attention import backend_names
from tessera.models import preset_names, random_weight_presets

PRESETS = preset_names()  # every model family's (configs/models/<name>.yaml)
# Presets that document a model this runtime cannot run yet: choosing one is an error saying why (none today).
UNSUPPORTED_PRESETS: dict[str, str] = {}
# Presets whose weights are random by design; the real architectures need a checkpoint.
RANDOM_WEIGHT_PRESETS = random_weight_presets()
DTYPES = ("float32", "bfloat16")
VAE_DTYPES = ("float32", "bfloat16", "float16")
QUANT_MODES = ("none", "fp8")  # model.quant: fp8 = the block linears in e4m3 (models/fp8.py)
# x264's speed presets, fastest first; `output.encoder_preset` picks one (python bench/write_video.py compares them).
ENCODER_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                   "placebo")
DEFAULT_ENCODER_PRESET = "veryfast"
SCHEDULERS = ("unipc", "euler", "dmd")
DEFAULT_DMD_TIMESTEPS = (1000, 757, 522)  # FastVideo's dmd_denoising_steps for the FastWan checkpoints
BACKENDS = (*backend_names(), "auto")  # the registered attention backends, and auto
SLA_FEATURE_MAPS = ("softmax", "elu", "relu")
CUDA_GRAPHS = ("auto", "true", "false")  # OmegaConf turns true/on into "True": compared lower-cased
OFFLOAD_EXPERTS = ("auto", "true", "false")  # compared lower-cased, as CUDA_GRAPHS


def _key(default: Any = MISSING, *, doc: str, example: str | tuple[str, ...], factory: Any = MISSING) -> Any:
    """A schema field with its one-line `--help` text and example values: the one source of both."""
    examples = (example,) if isinstance(example, str) else example
    return field(default=default, default_factory=factory, metadata={"help": doc, "examples": examples})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    preset: str = _key("wan-tiny", doc=f"architecture + generation defaults: {', '.join(PRESETS)}",
                       example="wan2.1-t2v-1.3b")
    path: str | None = _key(None, doc="local checkpoint: a diffusers directory, a folder of .safetensors or one "
                            ".safetensors file", example="/ckpt/Wan2.1-T2V-1.3B-Diffusers")
    dtype: str = _key("float32", doc=f"weight and compute dtype: {', '.join(DTYPES)}", example="bfloat16")
    # Replay each step's DiT forward from a CUDA graph (runtime/graphs.py): "auto" (on CUDA with one rank, only
    # the step plans a timed forward finds host-paced), "true" (always, also under SP / CFG-parallel, capturing
    # the NCCL collectives), "false".
    cuda_graphs: str = _key("auto", doc="replay each step's forward from a CUDA graph: auto, true or false",
                            example="false")
    # Refuse a request whose estimated memory (weights + activations + decode, per rank) exceeds what the device
    # has, before any weight loads (runtime/preflight.py); false skips the estimate.
    memory_check: bool = _key(True, doc="refuse a request that would not fit in device memory, before any "
                              "weight loads", example="false")
    # On CUDA every token-local op of a DiT block is a Triton kernel or a GEMM (models/wan/transformer.py,
    # `use_fast_stages`; with model.quant=fp8 the kernels also quantise their outputs), so the eager stages start at
    # once; true also torch.compiles them.
    compile: bool = _key(False, doc="torch.compile the DiT blocks' token-local stages on CUDA (seconds of compiling "
                         "on the first step of each shape, fewer from model.cache_dir)", example="true")
    cache_dir: str | None = _key("~/.cache/tessera", doc="where torch.compile and Triton keep compiled kernels and "
                                 "autotune results across launches (null: torch's defaults)", example="/scratch/cache")
    offload_text_encoder: bool = _key(False, doc="keep a loaded pipeline's text encoder in host memory between "
                                      "requests (API, server): device memory for the DiT, a copy per new prompt",
                                      example="true")
    # The Wan VAE's weights and activations; latents are cast in, frames come out as uint8 either way. bfloat16:
    # python bench/vae_decode.py measured 1.5x faster on an H200 at 480x832x81, frames within 1.7% (norm) of fp32.
    vae_dtype: str = _key("float32", doc=f"dtype the Wan VAE decodes in: {', '.join(VAE_DTYPES)}",
                          example="bfloat16")
    # FP8 (models/fp8.py): the DiT blocks' linear layers in e4m3 with per-channel weight and per-token activation
    # scales, quantised at load; needs model.dtype=bfloat16 and a GPU with FP8 tensor cores (checked before loading).
    quant: str = _key("none", doc=f"quantise the DiT blocks' linear layers at load: {', '.join(QUANT_MODES)}",
                      example="fp8")
    # Two-expert models (Wan2.2 A14B, runtime/experts.py): set from the checkpoint's model_index.json or the preset.
    # With random weights (model.path unset) it gives two random experts, for smoke runs of the switch.
    boundary_ratio: float | None = _key(None, doc="two-expert models (Wan2.2 A14B): the high-noise expert runs while "
                                        "the timestep >= boundary_ratio x 1000, the low-noise one after (null: one "
                                        "expert; read from the checkpoint)", example="0.875")
    # "auto": offload only when the pre-flight estimate says both experts do not fit (runtime/preflight.py).
    offload_experts: str = _key("auto", doc="two-expert models: keep the idle expert in host memory and move it to "
                                "the device at the switch: auto, true or false", example="true")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    # "auto" until `GenerateConfig.resolved(world_size)`; an int everywhere after launch.
    sp: int | str = _key("auto", doc="sequence-parallel degree; auto = world size / parallel.cfg",
                         example=("auto", "4"))
    cfg: int = _key(1, doc="CFG degree: 1 (cond and uncond batched) or 2 (split over 2 ranks)", example="2")
    # Every collective fails after this long instead of hanging on a dead or stuck peer rank.
    timeout_s: float = _key(600.0, doc="seconds before a collective fails instead of hanging on a dead peer",
                            example="600")


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    backend: str = _key("auto", doc="dense, vsa or sla (sparse), or auto (vsa where supported, else dense; the "
                        "report says why; sla only when asked for or by an SLA checkpoint)", example="vsa")
    # A float, or a list with one value per denoising step. VSA default 0.9, never a silent 0.
    sparsity: Any = _key(0.9, doc="VSA sparsity (fraction of key tiles skipped): one number, or a list with one "
                         "per step", example=("0.9", "[0.5,0.9,0.9]"))
    dense_blocks: list[int] = _key(doc="transformer blocks that always run dense attention", example="[0,29]",
                                   factory=list)
    dense_steps: int = _key(0, doc="the first N denoising steps run dense attention", example="10")
    # Sparse-linear attention (attention/sla.py): 1-D blocks of consecutive raster tokens.
    sla_topk: float = _key(0.1, doc="SLA: fraction of key blocks each query block attends to exactly, in (0, 1]",
                           example="0.15")
    sla_block_q: int = _key(128, doc="SLA: query tokens per block (a power of two)", example="64")
    sla_block_k: int = _key(64, doc="SLA: key tokens per block (a power of two)", example="32")
    sla_feature_map: str = _key("softmax", doc=f"SLA: feature map of the linear branch: {', '.join(SLA_FEATURE_MAPS)}",
                                example="elu")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    path: str | None = _key(None, doc="video file to write, its JSON report beside it (unset: a new numbered "
                            "file outputs/video-NNN.mp4 per run)", example="outputs/fox.mp4")
    overwrite: bool = _key(False, doc="replace existing output files", example="true")
    save_latents: bool = _key(False, doc="also write the final latents (.latents.safetensors)", example="true")
    # libx264's speed/size trade at the same quality (crf 23): see python bench/write_video.py for the numbers.
    encoder_preset: str = _key(DEFAULT_ENCODER_PRESET, example="medium",
                               doc=f"x264 speed preset of the mp4: {', '.join(ENCODER_PRESETS)}")
    # The model family's rate by default (the preset's or the checkpoint's): Wan2.1 and Wan2.2 A14B 16, Wan2.2
    # TI2V-5B 24 (models/wan/checkpoint.py TI2V_FPS). Sets only the playback rate: the frames are the same.
    fps: int = _key(16, doc="frames per second of the mp4, by model family: 16 for Wan2.1 and Wan2.2 A14B, 24 for "
                    "Wan2.2 TI2V-5B", example="24")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    prompt: str = _key("a red fox running through fresh snow, cinematic lighting",
                       doc="what the video shows (taken verbatim)", example="'a red fox in snow'")
    negative_prompt: str = _key("", doc="what the video should not show (taken verbatim; empty = none)",
                                example="'blurry, low quality'")
    image: str | None = _key(None, doc="image-to-video: the first frame, a PNG or JPEG file (needed by I2V "
                             "checkpoints, refused by text-only ones)", example="inputs/fox.png")
    seed: int = _key(0, doc="seed of the initial noise (and of wan-tiny's random weights)", example="42")
    num_frames: int = _key(17, doc="frames to generate: 4k+1 (the VAE packs 4 frames per latent frame)",
                           example="81")
    height: int = _key(128, doc="video height in pixels, a multiple of 16", example="480")
    width: int = _key(128, doc="video width in pixels, a multiple of 16", example="832")
    num_steps: int = _key(8, doc="denoising steps", example="50")
    guidance_scale: float = _key(5.0, doc="classifier-free guidance scale; 1 = no CFG", example="5.0")
    guidance_scale_2: float | None = _key(None, doc="two-expert models (Wan2.2 A14B): the low-noise expert's "
                                          "guidance scale (null: guidance_scale)", example="3.0")
    flow_shift: float = _key(3.0, doc="timestep shift of the flow schedule (Wan: 3.0 at 480p, 5.0 at 720p)",
                             example="5.0")
    scheduler: str = _key("unipc", doc=f"sampler: {', '.join(SCHEDULERS)} (dmd: few-step distilled checkpoints, "
                          "no CFG)", example=("euler", "dmd"))
    # DMD runs one step per entry, the DiT seeing the listed timestep itself; num_steps follows its length.
    dmd_timesteps: list[int] = _key(doc="timesteps of scheduler=dmd, strictly decreasing in [1, 1000]; num_steps "
                                    "follows its length", example="[1000,757,522]",
                                    factory=lambda: list(DEFAULT_DMD_TIMESTEPS))
    prompts_file: str | None = _key(None, doc="many videos in one launch: one prompt per line, or JSON lines of "
                                    "per-request keys ({\"prompt\": ..., \"seed\": 3})", example="prompts.txt")
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def resolved(self, world_size: int) -> GenerateConfig:
        """This config with `parallel.sp=auto` replaced by world_size // parallel.cfg: the one place `auto` becomes
        an int. Left as is when that is undefined (bad parallel.cfg, world size not a multiple): `validate` says
        why."""
        par = self.parallel
        if par.sp != "auto" or par.cfg not in (1, 2) or world_size % par.cfg != 0:
            return self
        return replace(self, parallel=replace(par, sp=world_size // par.cfg))

    def validate(self, world_size: int | None = None) -> None:
        """Raise ValueError/TypeError naming the first bad key; cheap, runs before any weight load. With
        `world_size`, on `resolved(world_size)`: parallel.sp=auto must have become an int."""
        _check_type("seed", self.seed, int)
        self._validate_sampler()
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
        _check_choice("model.preset", self.model.preset, PRESETS)
        why_not = UNSUPPORTED_PRESETS.get(self.model.preset)
        if why_not is not None:
            raise ValueError(f"model.preset={self.model.preset} cannot run yet: {why_not}. Its defaults are "
                             f"documented in configs/models/{self.model.preset}.yaml.")
        _check_choice("model.dtype", self.model.dtype, DTYPES)
        _check_choice("model.vae_dtype", self.model.vae_dtype, VAE_DTYPES)
        _check_choice("model.quant", self.model.quant, QUANT_MODES)
        if self.model.quant == "fp8" and self.model.dtype != "bfloat16":
            raise ValueError(f"model.quant=fp8 computes in bfloat16, but model.dtype={self.model.dtype}: set "
                             f"model.dtype=bfloat16, or model.quant=none")
        _check_choice("output.encoder_preset", self.output.encoder_preset, ENCODER_PRESETS)
        _check_type("output.fps", self.output.fps, int)
        if self.output.fps < 1:
            raise ValueError(f"output.fps={self.output.fps} must be a positive whole number of frames per second. "
                             f"Fix: {fix_example('output.fps')} (Wan2.2 TI2V-5B's), or 16 (Wan2.1's).")
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
        self._validate_experts()
        if self.image is not None:
            from tessera.runtime.image_conditioning import check_image_file  # here: it imports this module

            check_image_file(self.image)

    def _validate_sampler(self) -> None:
        """scheduler=dmd runs one step per dmd_timesteps entry and no CFG; checked before the generic keys, so the
        error says that DMD is why."""
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_dmd_timesteps(self.dmd_timesteps)
        if self.scheduler != "dmd":
            return
        if self.parallel.cfg == 2:
            raise ValueError(
                "parallel.cfg=2 cannot run scheduler=dmd: the DMD sampler is distilled without CFG (one conditional "
                "forward per step), so there is no branch to split. Set parallel.cfg=1 and use the ranks for "
                "parallel.sp."
            )
        if self.num_steps != len(self.dmd_timesteps):
            raise ValueError(
                f"num_steps={self.num_steps} but scheduler=dmd runs one step per entry of dmd_timesteps="
                f"{list(self.dmd_timesteps)}. Leave num_steps unset (it follows dmd_timesteps) or change dmd_timesteps."
            )
        if self.guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} but scheduler=dmd samples without CFG (the distilled "
                f"checkpoint has the guidance built in). Leave guidance_scale unset, or use scheduler=unipc for CFG."
            )

    def _validate_parallel(self, world_size: int | None) -> None:
        par = self.parallel
        if par.cfg not in (1, 2):
            raise ValueError(f"parallel.cfg={par.cfg} must be 1 (batched CFG) or 2 (CFG split over 2 ranks).")
        if par.sp != "auto" and (isinstance(par.sp, bool) or not isinstance(par.sp, int) or par.sp < 1):
            raise ValueError(
                f"parallel.sp={par.sp} must be auto or an integer >= 1. Fix: {fix_example('parallel.sp')}."
            )
        if not math.isfinite(par.timeout_s) or par.timeout_s <= 0:
            raise ValueError(
                f"parallel.timeout_s={par.timeout_s} must be > 0 seconds (collective timeout), e.g. 600."
            )
        if par.cfg == 2 and self.guidance_scale == 1.0:
            raise ValueError(
                "parallel.cfg=2 needs classifier-free guidance: set guidance_scale != 1 or parallel.cfg=1."
            )
        if world_size is None:
            return
        if par.sp == "auto":  # `resolved(world_size)` leaves it only where no whole number fits
            assert world_size % par.cfg != 0, "parallel.sp=auto: call cfg.resolved(world_size) before validate"
            raise ValueError(
                f"parallel.sp=auto: the world size {world_size} is not a multiple of parallel.cfg={par.cfg}, so "
                f"sp = world size / parallel.cfg is not a whole number. Fix: launch a multiple of {par.cfg} ranks "
                f"(--nproc_per_node={par.cfg * max(1, world_size // par.cfg)}) or set parallel.cfg=1."
            )
        if par.sp != "auto" and par.sp * par.cfg != world_size:
            raise ValueError(
                f"parallel.sp * parallel.cfg = {par.sp} * {par.cfg} = {par.sp * par.cfg} but the world size is "
                f"{world_size}. Set parallel.sp=auto (= world size / parallel.cfg) or launch with "
                f"--nproc_per_node={par.sp * par.cfg}."
            )

    def _validate_experts(self) -> None:
        """model.boundary_ratio, model.offload_experts and guidance_scale_2 (the low-noise expert's scale): the last
        two mean something only for a two-expert model (diffusers' WanPipeline refuses guidance_scale_2 without a
        boundary_ratio too)."""
        ratio, gs2 = self.model.boundary_ratio, self.guidance_scale_2
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
            raise ValueError(f"model.boundary_ratio={ratio!r} must lie in (0, 1) (the high-noise expert runs while the "
                             f"timestep >= boundary_ratio x 1000). Fix: {fix_example('model.boundary_ratio')} "
                             f"(Wan2.2 T2V-A14B's), or leave it to the checkpoint.")
        offload = str(self.model.offload_experts).lower()
        _check_choice("model.offload_experts", offload, OFFLOAD_EXPERTS)
        if ratio is None and offload == "true":
            raise ValueError("model.offload_experts=true but this model has one expert (model.boundary_ratio is "
                             "unset): there is no idle expert to keep in host memory. Fix: drop model.offload_experts.")
        if gs2 is None:
            return
        if ratio is None:
            raise ValueError(f"guidance_scale_2={gs2} is the low-noise expert's guidance scale, but this model has one "
                             f"expert (a Wan2.1 checkpoint: no transformer_2/, model.boundary_ratio unset). Fix: drop "
                             f"guidance_scale_2 and set guidance_scale, or load a two-expert (Wan2.2 A14B) checkpoint.")
        if not math.isfinite(gs2) or gs2 < 0:
            raise ValueError(f"guidance_scale_2={gs2} must be a finite number >= 0 (1 = no guidance in the "
                             f"low-noise steps), or null for guidance_scale.")
        if self.guidance_scale == 1.0 and gs2 != 1.0:
            raise ValueError(f"guidance_scale_2={gs2} with guidance_scale=1: guidance_scale=1 turns classifier-free "
                             f"guidance off for the whole request (as in diffusers' WanPipeline, which then ignores "
                             f"guidance_scale_2). Fix: set guidance_scale != 1, or drop guidance_scale_2.")

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
        self._validate_sla()

    def _validate_sla(self) -> None:
        """SLA's keys, checked whatever the backend (cheap, and a typo should not wait for the day SLA runs)."""
        att = self.attention
        if isinstance(att.sla_topk, bool) or not isinstance(att.sla_topk, (int, float)) or not 0 < att.sla_topk <= 1:
            raise ValueError(f"attention.sla_topk={att.sla_topk!r} must lie in (0, 1] (the fraction of key blocks "
                             f"each query block attends to exactly). Fix: attention.sla_topk=0.1 (the SLA "
                             f"checkpoints' value).")
        for key in ("sla_block_q", "sla_block_k"):
            value = getattr(att, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"attention.{key}={value!r} must be a power of two (the kernels' tile sizes). "
                                 f"Fix: attention.{key}={128 if key == 'sla_block_q' else 64} (the default).")
        _check_choice("attention.sla_feature_map", att.sla_feature_map, SLA_FEATURE_MAPS)


def check_dmd_timesteps(timesteps: Any, num_train_timesteps: int = 1000) -> None:
    """TypeError/ValueError naming `dmd_timesteps` unless it is a non-empty, strictly decreasing list of whole
    numbers in [1, num_train_timesteps]."""
    fix = f"Fix: {fix_example('dmd_timesteps')} (FastWan's)."
    if not isinstance(timesteps, (list, tuple)):
        raise TypeError(f"dmd_timesteps={timesteps!r} must be a list of whole numbers. {fix}")
    if not timesteps:
        raise ValueError(f"dmd_timesteps is empty: the DMD sampler needs at least one timestep. {fix}")
    for value in timesteps:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"dmd_timesteps entry {value!r} must be a whole number. {fix}")
        if not 1 <= value <= num_train_timesteps:
            raise ValueError(f"dmd_timesteps entry {value} lies outside [1, {num_train_timesteps}] (the training "
                             f"timesteps). {fix}")
    for prev, nxt in zip(timesteps[:-1], timesteps[1:], strict=True):
        if nxt >= prev:
            raise ValueError(f"dmd_timesteps={list(timesteps)} must be strictly decreasing (from noise to data): "
                             f"{nxt} follows {prev}. {fix}")


def sparsity_schedule(sparsity: Any, num_steps: int) -> tuple[float, ...]:
    """One sparsity per step from a float or a per-step list; TypeError/ValueError naming the key."""
    fix = f"Fix: {fix_example('attention.sparsity')} (one value per step)."
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        return (float(sparsity),) * num_steps
    if not isinstance(sparsity, (list, tuple)):
        raise TypeError(f"attention.sparsity={sparsity!r} must be a number in [0, 1) or a list of them. {fix}")
    if len(sparsity) != num_steps:
        raise ValueError(
            f"attention.sparsity has {len(sparsity)} entries but num_steps={num_steps}: "
            f"give one value per step, or a single number. {fix}"
        )
    for value in sparsity:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"attention.sparsity entry {value!r} must be a number in [0, 1). {fix}")
    return tuple(float(v) for v in sparsity)


def schema_field(key: str) -> Field:
    """The dataclass field of a dotted key, e.g. "attention.sparsity"; KeyError when there is none."""
    schema: Any = GenerateConfig
    *sections, name = key.split(".")
    for section in sections:
        schema = {f.name: f for f in fields(schema)}[section].default_factory
        if not isinstance(schema, type) or not is_dataclass(schema):
            raise KeyError(key)
    return {f.name: f for f in fields(schema)}[name]


def fix_example(key: str) -> str:
    """'e.g. key=<example>[ or key=<example>]' from the schema, for error messages."""
    return "e.g. " + " or ".join(f"{key}={value}" for value in schema_field(key).metadata["examples"])


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}. Set {key}=<one of those>.")


def _check_type(key: str, value: Any, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{key}={value!r} must be of type {kind.__name__}. Fix: {fix_example(key)}.")
