"""`model.vae_dtype`: the Wan VAE decodes in bfloat16/float16 close to float32, float32 is the exact path of before.

A tiny random `AutoencoderKLWan` (tests/runtime/test_parallel_decode.py's "tiny") decodes on the CPU in one process;
the pipeline test runs `tessera.load` on a tiny random diffusers checkpoint (tests/runtime/_wan_checkpoint.py).
Bounds are on frames in [0, 1] against the float32 decode, from measured errors (seed 0, three latent shapes):
bfloat16 max |diff| 1.7e-2 (4 uint8 levels), norm rel 3.2e-3; float16 max 1.7e-3, norm rel 4.0e-4.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tessera.launch.config import resolve_config
from tessera.runtime.preflight import estimate_request_memory

pytest.importorskip("diffusers")

from tessera.models.wan.vae import WanVAEDecoder  # noqa: E402

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
# dtype -> (max |diff| of [0, 1] frames, norm-relative diff, uint8 levels): about 2.5x the measured errors
BOUNDS = {"bfloat16": (0.04, 1e-2, 10), "float16": (0.005, 1e-3, 2)}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKLWan(**TINY_VAE).eval().save_pretrained(str(path))
    return path


def _latents(frames: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(height))


@torch.inference_mode()
def test_float32_is_the_path_of_before_bit_for_bit(vae_dir):
    """float32 (the default) is exactly: diffusers' fp32 decode of latents / (1 / std) + mean, then diffusers'
    postprocess and export_to_video's uint8 truncation."""
    from diffusers import AutoencoderKLWan

    latents = _latents(3, 7, 6)
    vae = AutoencoderKLWan.from_pretrained(str(vae_dir)).eval()
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(shape) for v in (vae.config.latents_mean,
                                                                            vae.config.latents_std))
    video = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]
    expected = (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()
    decoder = WanVAEDecoder(vae_dir, torch.device("cpu"))
    assert decoder.dtype == torch.float32 and next(decoder.vae.parameters()).dtype == torch.float32
    assert torch.equal(decoder.decode_float(latents), expected)
    assert torch.equal(decoder.decode(latents), (expected * 255).to(torch.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(3, 7, 6), (3, 12, 10)])
@torch.inference_mode()
def test_low_precision_decode_is_close_to_float32(vae_dir, dtype, shape):
    latents = _latents(*shape)
    reference = WanVAEDecoder(vae_dir, torch.device("cpu"))
    decoder = WanVAEDecoder(vae_dir, torch.device("cpu"), dtype=getattr(torch, dtype))
    assert next(decoder.vae.parameters()).dtype == getattr(torch, dtype)
    ref, ref_uint8 = reference.decode_float(latents), reference.decode(latents)
    assert ref.std() > 0.05 and ((ref > 0) & (ref < 1)).float().mean() > 0.9  # not clamped flat
    frames, frames_uint8 = decoder.decode_float(latents), decoder.decode(latents)
    assert frames.dtype == torch.float32 and frames_uint8.dtype == torch.uint8 and frames.shape == ref.shape
    max_abs, norm_rel, levels = BOUNDS[dtype]
    diff = frames - ref
    assert diff.abs().max() <= max_abs and diff.norm() / ref.norm() <= norm_rel
    assert diff.norm() / ref.norm() > 1e-5  # it really decoded in the lower precision
    assert (frames_uint8.int() - ref_uint8.int()).abs().max() <= levels


def test_vae_dtype_is_validated_naming_the_key():
    cfg, _ = resolve_config(["model.vae_dtype=float64"])
    with pytest.raises(ValueError, match=r"model\.vae_dtype='float64' is not one of float32, bfloat16, float16"):
        cfg.validate()
    assert resolve_config([])[0].model.vae_dtype == "float32"


def test_memory_estimate_counts_the_vae_in_its_dtype():
    cfg, arch = resolve_config(["model.preset=wan2.1-t2v-1.3b", "num_frames=81", "height=480", "width=832"])
    decode = {}
    for dtype in ("float32", "bfloat16", "float16"):
        # a (pretend) checkpoint: the estimate counts the Wan VAE only when there is one
        with_vae = replace(cfg, model=replace(cfg.model, path="/ckpt", vae_dtype=dtype))
        decode[dtype] = estimate_request_memory(with_vae, arch, sp=1, rank=1).decode  # rank 1: no gather
    frames = (4 * 3 + 3) * 81 * 480 * 832  # this rank's float32 and uint8 frames, whatever the VAE's dtype
    assert decode["bfloat16"] - frames == decode["float16"] - frames == (decode["float32"] - frames) // 2 > 0


@pytest.mark.slow
def test_pipeline_decodes_in_vae_dtype_and_reports_it(tmp_path):
    pytest.importorskip("transformers")
    import tessera
    from _wan_checkpoint import write_diffusers_checkpoint

    ckpt = write_diffusers_checkpoint(tmp_path / "Wan2.1-tiny-Diffusers")
    request = dict(prompt="a red fox in snow", seed=3, num_frames=9, height=32, width=48, num_steps=2)
    videos = {}
    for dtype in ("float32", "bfloat16"):
        with tessera.load(model={"path": str(ckpt), "vae_dtype": dtype}, attention={"backend": "dense"}) as pipe:
            videos[dtype] = pipe.generate(**request)
            assert pipe._pipe._decoder.dtype == getattr(torch, dtype)
    fp32, bf16 = videos["float32"], videos["bfloat16"]
    assert fp32.report["decode"]["dtype"] == "float32" and bf16.report["decode"]["dtype"] == "bfloat16"
    assert bf16.report["config"]["model"]["vae_dtype"] == "bfloat16"
    assert torch.equal(fp32.latents, bf16.latents)  # the DiT is untouched: only the decode differs
    assert bf16.frames.shape == fp32.frames.shape == (9, 32, 48, 3) and bf16.frames.dtype.name == "uint8"
    levels = abs(bf16.frames.astype(int) - fp32.frames.astype(int))
    assert levels.max() <= BOUNDS["bfloat16"][2] and 0 < levels.mean() < 2
