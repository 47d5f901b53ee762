"""The orchestrator: config -> model, text, noise, per-request state -> denoising loop -> video + report.

Model-agnostic: the model family of `model.path` (or of the preset) builds the DiT, its text encoder, latent decoder
and image encoders (`models/family.py`). `generate` runs on every rank of the mesh (the loop: runtime/denoise.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tessera.attention import MetadataCache, backend_names, get_backend
from tessera.models import family_for
from tessera.models.family import TEXT_ONLY, DiT, token_grid
from tessera.models.fp8 import check_quant_supported
from tessera.parallel import ParallelMesh, build_row_split, warmup_collectives
from tessera.runtime.build import RANDOM_WEIGHTS_SEED, build_experts, note_missing_layer_weights
from tessera.runtime.compile_cache import (
    DeviceWarmup,
    compile_cache_counters,
    compile_cache_report,
    use_compile_cache,
)
from tessera.runtime.config import GenerateConfig
from tessera.runtime.denoise import denoise, elapsed_synced, log_main
from tessera.runtime.experts import ExpertRun, build_expert_schedule
from tessera.runtime.faults import NO_FAULTS, FaultPlan
from tessera.runtime.graphs import GraphedForward, resolve_cuda_graphs
from tessera.runtime.guards import (
    Interrupted,
    Progress,
    RankFailure,
)
from tessera.runtime.image_conditioning import ImageConditioner, ImageInput, check_image_object
from tessera.runtime.output import (
    EncodedVideo,
    VideoEncodeStream,
    output_files,
    write_json_atomic,
    write_latents_atomic,
    write_video_atomic,
)
from tessera.runtime.plan import AttentionPlan, build_attention_plan
from tessera.runtime.precision import exact_fp32
from tessera.runtime.report import (
    collect_provenance,
    gather_rank_stats,
    peak_memory,
    request_report,
    reset_peak_memory,
)
from tessera.runtime.request import build_request_state
from tessera.runtime.samplers import build_sampler

# The report's `stage_seconds`: text_encode includes loading the encoder, load is the DiT's weights, denoise
# includes first_step; decode and write (the video and latents, not the JSON itself) are measured on rank 0 only.
STAGES = ("load", "text_encode", "first_step", "denoise", "decode", "write", "total")
log = logging.getLogger("tessera")


@dataclass(frozen=True)
class GenerateResult:
    latents: torch.Tensor  # [1, C, F, H/s, W/s] float32 on the rank's device (the VAE's format), before decoding
    frames: torch.Tensor | None  # uint8 [T, H, W, 3] on the CPU, decoded on rank 0 (None on the other ranks)
    report: dict
    # rank 0: the mp4 encoded while the frames were decoded (one decoding rank), at the request's fps and preset
    encoded: EncodedVideo | None = None


# Text embeddings kept per pipeline while its encoder is loaded: UMT5's [512, 4096] bf16 is 4 MiB a prompt.
MAX_CACHED_PROMPTS = 64
def request_prompts(cfg: GenerateConfig) -> list[str]:
    """The prompts one request encodes: the prompt, and the negative one when it uses CFG."""
    return [cfg.prompt, cfg.negative_prompt] if cfg.guidance_scale != 1.0 else [cfg.prompt]


class Pipeline:
    """A loaded model on this rank of the mesh: DiT weights (its kernels loaded once), text encoder, decoder and the VSA
    metadata cache, reused by every `generate` (the Python API and the server keep one; the CLI makes one per
    launch). SPMD: every rank of the mesh builds it and makes the same calls.

    `prompts` are encoded while loading, before the DiT (text embeddings are cached per prompt). With
    `keep_text_encoder=False` the encoder is freed right after them, so the load's peak is the larger of the two
    models, not their sum (the CLI: it knows every prompt up front); a later request with a new prompt then fails.
    The encoder runs once per node (local rank 0) and its embeddings are broadcast over the node's ranks.
    A two-expert model (`model.boundary_ratio`) holds both DiTs in `experts` (runtime/experts.py). Everything
    model-specific comes from the model family of `model.path` (or of the preset): `models/family.py`.
    """

    def __init__(
        self, cfg: GenerateConfig, model_cfg, mesh: ParallelMesh, *, prompts: Sequence[str] = (),
        keep_text_encoder: bool = True, faults: FaultPlan = NO_FAULTS, progress: Progress | None = None,
        checkpoint=None,
    ) -> None:
        progress = progress or Progress()
        self.cfg, self.mesh, self.dtype = cfg, mesh, getattr(torch, cfg.model.dtype)
        self.vae_dtype = getattr(torch, cfg.model.vae_dtype)  # the VAE's; the tiny preview decoder is float32
        check_quant_supported(cfg.model.quant, mesh.device)  # FP8 on this device, before anything loads
        self.family = family = family_for(cfg.model.path, cfg.model.preset)
        candidates = backend_names() if cfg.attention.backend == "auto" else (cfg.attention.backend,)
        if any(get_backend(name).uses_gate for name in candidates):  # gated (VSA) blocks: a gate projection,
            model_cfg = family.with_gate(model_cfg)  # zero-initialised when the checkpoint lacks it
        self.model_cfg = model_cfg
        # The checkpoint, resolved once (JSON and safetensors headers) and passed to whatever loads a part of it.
        self.checkpoint = family.checkpoint_at(cfg.model.path, checkpoint)  # the launch's, when it passes it
        self.latents = family.latents(self.checkpoint)  # channels and compression of the VAE's latent space
        self.conditioning = family.plan_conditioning(self.checkpoint, cfg.model.preset)  # fails early
        if cfg.image is not None:  # an image given at load (the CLI's first request, the API's defaults) must fit
            self.check_request(cfg, image_given=True)
        self.image_conditioner = ImageConditioner(family.plan_image(model_cfg, self.checkpoint, cfg.model.preset),
                                                  mesh, self.dtype)
        self.metadata_cache = MetadataCache()
        self._embeddings: dict[str, torch.Tensor] = {}
        self._text_encoder = None
        self._encoder_released = False
        self._decoder = None
        reset_peak_memory(mesh.device)
        progress.stage = "load"
        faults.fire_phase("load", mesh.rank)
        self.compile_cache = use_compile_cache(cfg.model.cache_dir)  # before anything compiles
        warmup = DeviceWarmup(mesh.device, self.dtype).start()  # the libraries' start-up, while the weights load
        with exact_fp32(self.dtype, mesh.device):
            t0 = time.perf_counter()
            if mesh.rank == mesh.node_leader:
                self._text_encoder = family.build_text_encoder(self.conditioning, model_cfg.text_dim,
                                                               RANDOM_WEIGHTS_SEED, mesh.device, self.dtype,
                                                               show_progress=mesh.is_main)
            self.encode(prompts)
            if not keep_text_encoder:
                self._text_encoder, self._encoder_released = None, True
                free_device_memory(mesh.device)
            elif cfg.model.offload_text_encoder and self._text_encoder is not None:
                self._place_text_encoder(torch.device("cpu"))  # back on the device only to encode a new prompt
            self._pending = {"text_encode": elapsed_synced(t0, mesh.device)}  # reported by the first request
            log_main(mesh, "text encoded in %.2f s", self._pending["text_encode"])
            t0 = time.perf_counter()
            self.experts, self.load_info = build_experts(cfg, family, model_cfg, mesh, self.checkpoint)
            self.warmup = warmup.join()  # normally done by now
            self._pending["load"] = elapsed_synced(t0, mesh.device)
        note_missing_layer_weights(cfg, self.model, self.load_info)
        log_main(mesh, "weights loaded: %.2f GiB in %.2f s", self.load_info["parameter_bytes"] / 2**30,
                  self._pending["load"])

    @property
    def model(self) -> DiT:
        """The DiT (two-expert models: the high-noise expert, `transformer`; both: `experts.models`)."""
        return self.experts.models[0]

    @torch.inference_mode()  # the encoders return inference tensors; broadcast writes into them
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [len(prompts), L, text_dim] in the model dtype on this rank's device. New prompts are
        encoded by the node's local rank 0 and broadcast over the node; every prompt is encoded once per pipeline."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        if new:
            if self._encoder_released:
                raise ValueError(f"prompt {new[0]!r} was not encoded while loading and the text encoder is released "
                                 f"(keep_text_encoder=False): load the pipeline with every prompt, or keep it")
            mesh = self.mesh
            shape = (len(new), self.family.text_sequence_length(self.conditioning), self.model_cfg.text_dim)
            if self._text_encoder is not None:
                self._place_text_encoder(mesh.device)
                text = self._text_encoder.encode(new).to(device=mesh.device, dtype=self.dtype).contiguous()
                if self.cfg.model.offload_text_encoder:
                    self._place_text_encoder(torch.device("cpu"))
            else:
                text = torch.empty(shape, device=mesh.device, dtype=self.dtype)
            if mesh.node_group is not None:
                dist.broadcast(text, src=mesh.node_leader, group=mesh.node_group)
            self._embeddings.update(zip(new, text, strict=True))
            if not self._encoder_released:  # a server sees new prompts forever: keep the newest, re-encode the rest
                stale = [p for p in self._embeddings if p not in prompts]
                for prompt in stale[: max(0, len(self._embeddings) - MAX_CACHED_PROMPTS)]:
                    del self._embeddings[prompt]
        return torch.stack([self._embeddings[p] for p in prompts]) if prompts else torch.empty(0)

    def _place_text_encoder(self, device: torch.device) -> None:
        """Move the text encoder (`model.offload_text_encoder`: to the host between requests, back to encode)."""
        encoder = self._text_encoder
        if getattr(encoder, "device", device) == device:
            return
        if hasattr(encoder, "model"):  # UMT5: the weights move; the byte-level stand-in has only CPU tables
            encoder.model.to(device)
        encoder.device = device
        if device.type == "cpu":
            free_device_memory(self.mesh.device)

    def check_request(self, cfg: GenerateConfig, *, image_given: bool) -> None:
        """ValueError before any work when a request's size or image does not fit the model (cheap)."""
        where = f"model.path={cfg.model.path}" if cfg.model.path else f"model.preset={cfg.model.preset}"
        self.family.check_request(self.checkpoint, self.model_cfg, height=cfg.height, width=cfg.width,
                                  preset=cfg.model.preset, image=_image_name(cfg) if image_given else None,
                                  where=where)

    def generate(self, cfg: GenerateConfig, *, image: ImageInput | None = None, faults: FaultPlan = NO_FAULTS,
                 progress: Progress | None = None, on_step: Callable[[int, int], None] | None = None) -> GenerateResult:
        """Run one request (per-request keys of `cfg`; its `model.*` and `parallel.*` must be the pipeline's).

        Returns the final latents on every rank and, on rank 0, the decoded frames; writes nothing (see
        `write_outputs`). Nothing is decoded unless every rank's latents stayed finite. `on_step(step, num_steps)`
        runs on every rank after each denoising step (0-based); raising `Cancelled` there stops the request at
        that step boundary (every rank must raise it after the same step). `image`: an image-to-video request's first
        frame as a PIL image or uint8 array (rank 0's is used), instead of `cfg.image`'s file."""
        self.check_request(cfg, image_given=image is not None or cfg.image is not None)
        if image is not None:
            check_image_object(image)
        if (cfg.model, cfg.parallel) != (self.cfg.model, self.cfg.parallel):
            raise ValueError("model.* and parallel.* are fixed when the pipeline loads; load another pipeline to "
                             "change them")
        progress = progress or Progress()
        with exact_fp32(self.dtype, self.mesh.device):
            return self._generate(cfg, faults.for_seed(cfg.seed), progress, on_step, image)

    @torch.inference_mode()
    def _generate(self, cfg: GenerateConfig, faults: FaultPlan, progress: Progress,
                  on_step: Callable[[int, int], None] | None = None, image: ImageInput | None = None) -> GenerateResult:
        t_start = time.perf_counter()
        mesh, device, model_cfg, dtype = self.mesh, self.mesh.device, self.model_cfg, self.dtype
        grid = token_grid(cfg.num_frames, cfg.height, cfg.width, model_cfg.patch_size, self.latents)
        plan = build_attention_plan(
            cfg.attention, num_layers=model_cfg.num_layers, num_steps=cfg.num_steps,
            grid_thw=grid, head_dim=model_cfg.attention_head_dim, dtype=dtype, device=device,
        )
        provenance, compiled_before = collect_provenance(device), compile_cache_counters()
        stage_seconds: dict[str, float | None] = dict.fromkeys(STAGES)
        stage_seconds.update({"load": 0.0, "text_encode": 0.0, **self._pending})  # the load: in the first request
        self._pending = {}
        t0 = time.perf_counter()
        text = self.encode(request_prompts(cfg))
        stage_seconds["text_encode"] += time.perf_counter() - t0
        if mesh.cfg_size == 2:
            text = text[mesh.cfg_rank : mesh.cfg_rank + 1]  # rank 0 of the cfg axis: cond, rank 1: uncond

        scheduler = build_sampler(cfg)  # per request: DMD's noise generator is seeded here
        latents = scheduler.initial_noise(1, cfg.num_frames, cfg.height, cfg.width, self.latents).to(device)
        image_cond = self.image_conditioner.condition(cfg, image, batch=text.shape[0])  # I2V: once, before the loop
        scheduler.prepare(device, torch.float32)
        run = self._expert_run(cfg, scheduler, plan, grid, image_cond.clean_first_frame)
        warmup_collectives(mesh)
        latents, step_seconds, loop_seconds = denoise(cfg, latents, text, scheduler, run, faults, progress, mesh,
                                                      dtype, on_step, image_cond)
        latents = image_cond.with_clean_first_frame(latents)  # TI2V from an image: the image's frame, as diffusers
        stage_seconds["first_step"], stage_seconds["denoise"] = step_seconds[0], loop_seconds
        # Every rank, once per request (never per step): rank 0 alone goes on to decode.
        ranks = gather_rank_stats({"rank": mesh.rank, "step_seconds": step_seconds,
                                   "peak_memory_bytes": peak_memory(device), "device": str(device)}, mesh)
        report = request_report(cfg, self.family, model_cfg, mesh, plan, run.states[0], self.load_info)
        report["sampler"] = scheduler.describe()  # its name, the model timestep and the sigma of each step
        report.update(provenance=provenance, ranks=ranks, step_seconds=step_seconds, denoise_seconds=loop_seconds,
                      stage_seconds=stage_seconds, cuda_graphs=run.cuda_graphs_report(),
                      compile_cache={**compile_cache_report(self.compile_cache, compiled_before),
                                     "device_warmup": self.warmup},
                      conditioning={"text_encoder": self.conditioning.text, "decoder": self.conditioning.decoder})
        if image_cond is not TEXT_ONLY:
            report["image"] = image_cond.report  # rank 0's: source, size, encode seconds, aspect warning
        if len(self.experts.models) > 1:
            report["experts"] = run.report(cfg)  # per step the expert and guidance scale; the weight moves
        del run  # the graphs' pool holds the forwards' activations
        progress.stage = "decode"
        frames, encoded = self._decode(cfg, latents, report, faults)
        if frames is not None:
            report["video"]["fps"] = cfg.output.fps  # a per-request key: the writer's rate
            report["video"]["encoded_while_decoding"] = encoded is not None
        stage_seconds["total"] = time.perf_counter() - t_start + stage_seconds["load"]
        report["total_seconds"] = stage_seconds["total"]
        return GenerateResult(latents=latents, frames=frames, report=report, encoded=encoded)

    def _expert_run(self, cfg: GenerateConfig, scheduler, plan: AttentionPlan, grid: tuple[int, int, int],
                    clean_first_frame: bool = False) -> ExpertRun:
        """Per expert its request state (attention contexts built on its modules; the metadata cache is shared) and
        its forward (CUDA graphs per expert); per step the expert and guidance scale, from the sampler's timesteps.
        `clean_first_frame`: the first latent frame's tokens run at timestep 0 (TI2V from an image)."""
        mesh, models = self.mesh, self.experts.models
        schedule = build_expert_schedule(cfg, scheduler.timesteps, len(models))
        graphs = resolve_cuda_graphs(cfg.model.cuda_graphs, mesh.device, mesh.world_size)
        states = tuple(build_request_state(model, plan, grid, mesh, self.metadata_cache,
                                           clean_first_frame=clean_first_frame) for model in models)
        forwards = tuple(GraphedForward(model, enabled=graphs != "never", adaptive=graphs == "adaptive")
                         for model in models)
        return ExpertRun(self.experts, schedule, states, forwards)

    def _decode(
        self, cfg: GenerateConfig, latents: torch.Tensor, report: dict, faults: FaultPlan
    ) -> tuple[torch.Tensor | None, EncodedVideo | None]:
        """The frames (uint8 [T, H, W, 3], CPU) on rank 0, None elsewhere, and the mp4 when it could be encoded
        while decoding; fills the report's decode entries. The Wan VAE decodes on every rank (a block of the latent
        rows each) and gathers the frames on rank 0; when one rank decodes, each latent frame's 4 video frames go to
        the encoder (`VideoEncodeStream`: ffmpeg in its own process) as soon as they are decoded. The preview
        decoder runs on rank 0 alone."""
        mesh, device = self.mesh, self.mesh.device
        every_rank_decodes = self.conditioning.every_rank_decodes
        if not (mesh.is_main or every_rank_decodes):
            return None, None
        free_device_memory(device)
        t0 = time.perf_counter()
        if self._decoder is None:
            self._decoder = self.family.build_latent_decoder(
                self.conditioning, RANDOM_WEIGHTS_SEED, device, show_progress=mesh.is_main,
                split_rows=lambda height: build_row_split(height, mesh), dtype=self.vae_dtype)
        if mesh.is_main:
            faults.fire_phase("decode", 0)  # rank 0's; the other ranks then fail on the exchange with it
        peak_before_decode = peak_memory(device)
        reset_peak_memory(device)
        encoded = None
        if mesh.is_main and every_rank_decodes and self._decoder.streams(latents.shape[3]):
            stream = VideoEncodeStream(cfg.output.fps, cfg.output.encoder_preset)
            try:
                self._decoder.decode_streaming(latents, lambda chunk_BTHW3: stream.put(chunk_BTHW3[0]))
            finally:
                encoded = stream.finish()  # joins the encoder thread, also when decoding failed
            decoded = torch.cat(stream.host_frames)[None]
        else:
            decoded = self._decoder.decode(latents)  # the frames on rank 0, None on the others
        decode_peak = peak_memory(device)
        if not mesh.is_main:
            return None, None
        frames = decoded[0].cpu()
        report["stage_seconds"]["decode"] = elapsed_synced(t0, device)
        log.info("decode %.2f s", report["stage_seconds"]["decode"])
        decode_ranks = self._decoder.decode_ranks(latents.shape[3]) if every_rank_decodes else 1
        decode_dtype = str(self.vae_dtype if every_rank_decodes else torch.float32).removeprefix("torch.")
        report["decode"] = {"ranks": decode_ranks, "peak_memory_bytes": decode_peak, "dtype": decode_dtype}  # rank 0's
        report["peak_memory_bytes"] = max(peak_before_decode, decode_peak)  # rank 0's, the decode included
        report["latent_shape"] = list(latents.shape)
        report["video"] = {"frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                           "width": int(frames.shape[2])}
        return frames, encoded


def generate(cfg: GenerateConfig, model_cfg, mesh: ParallelMesh, faults: FaultPlan = NO_FAULTS) -> GenerateResult:
    """The CLI's one request: load (text first, the encoder freed before the DiT), generate, and on rank 0 write
    the video, the JSON report and optionally the latents. See `generate_many`."""
    return generate_many([cfg], model_cfg, mesh, faults)[0]


def generate_many(
    cfgs: Sequence[GenerateConfig], model_cfg, mesh: ParallelMesh, faults: FaultPlan = NO_FAULTS,
    checkpoint=None,
) -> list[GenerateResult]:
    """Load once, then run every request in turn, rank 0 writing each one's files (`prompts_file=`).

    Any exception is re-raised as `RankFailure` (a KeyboardInterrupt as `Interrupted`) naming this rank and
    the phase: "config", "load", "step N" (0-based), "decode" or "write", with the original as its cause.
    Nothing is decoded or written unless every rank's latents stayed finite; a request's output files land
    together or not at all. `faults` is for tests only (runtime/faults.py). `checkpoint`: `model.path` as the
    launch resolved it.
    """
    progress = Progress()
    try:
        prompts = [p for cfg in cfgs for p in request_prompts(cfg)]
        pipe = Pipeline(cfgs[0], model_cfg, mesh, prompts=prompts, keep_text_encoder=False, faults=faults,
                        progress=progress, checkpoint=checkpoint)
        results = []
        for cfg in cfgs:
            result = pipe.generate(cfg, faults=faults, progress=progress)
            if mesh.is_main:
                progress.stage = "write"
                write_outputs(cfg, result, faults)
            results.append(result)
        return results
    except KeyboardInterrupt as err:
        raise Interrupted.at(err, mesh.rank, progress.phase) from err
    except Exception as err:
        raise RankFailure(mesh.rank, progress.phase, err) from err


def write_outputs(cfg: GenerateConfig, result: GenerateResult, faults: FaultPlan = NO_FAULTS) -> list[Path]:
    """Rank 0: the video, the latents (with `output.save_latents`) and last the JSON report, all or none, at
    `cfg.output.path` with its overwrite rule. Returns the files written."""
    report, frames, t0 = result.report, result.frames, time.perf_counter()
    faults = faults.for_seed(cfg.seed)
    (out, _), (report_path, _), *latents_path = output_files(cfg.output.path, cfg.output.save_latents)
    report["video"]["path"] = str(out)
    written: list[Path] = []
    try:  # all files or none: a failure (disk full, interrupt) removes those already written
        encoded = result.encoded
        if encoded is not None and (encoded.fps, encoded.preset) == (cfg.output.fps, cfg.output.encoder_preset):
            written.append(encoded.copy_atomic(out, overwrite=cfg.output.overwrite))  # encoded while decoding
        else:
            written.append(write_video_atomic(out, frames.numpy(), fps=cfg.output.fps,
                                              overwrite=cfg.output.overwrite, preset=cfg.output.encoder_preset))
        for path, _ in latents_path:
            written.append(write_latents_atomic(path, result.latents.float().cpu(), overwrite=cfg.output.overwrite))
        faults.fire_phase("write", 0)
        stages = report["stage_seconds"]
        stages["write"] = time.perf_counter() - t0
        stages["total"] += stages["write"]
        report["total_seconds"] = stages["total"]
        written.append(write_json_atomic(report_path, report, overwrite=cfg.output.overwrite))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d frames, %.1f s total)", out, frames.shape[0], report["total_seconds"])
    return written


def _image_name(cfg: GenerateConfig) -> str:
    """The image's name in messages: its path, or (an API object) a placeholder."""
    return str(cfg.image) if cfg.image is not None else "<an image object>"


def free_device_memory(device: torch.device) -> None:
    """Return cached blocks to the driver after dropping a large module (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
