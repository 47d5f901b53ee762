"""Wan2.2 TI2V-5B (text- and image-to-video) on a tiny random TI2V checkpoint (CPU, fp32) against diffusers.

The checkpoint (`write_ti2v_checkpoint`) has the Wan2.2 VAE layout (48 latent channels, 16x spatial compression, 2x2
patchified RGB) and `expand_timesteps` in model_index.json, so diffusers gives the DiT one timestep per token; every
token gets the same t without an image, which our scalar-timestep DiT computes identically. Proven here: the final
latents equal WanPipeline's at 1 rank (Python API) and 2 ranks (torchrun + gloo, the API under SPMD), the decoded
frames equal diffusers' decode (at 2 ranks through the row-parallel VAE); from an image (the first latent frame the
image's, its tokens at t = 0) the final latents equal WanImageToVideoPipeline's (expand_timesteps) at 1 rank and at 2
ranks with VSA (sparsity 0: exact) in its tile order; the FastWan (DMD) path equals the DMD reference of test_dmd.py
on the TI2V latent grid, VSA runs on a TI2V grid with partial tiles, checkpoints pick their presets and fps, and bad
input (an image for FastWan, a size the VAE x patch does not divide, output.fps) fails before any weights load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from _runs import rel_err  # noqa: E402
from _wan_checkpoint import TI2V_Z_DIM, write_ti2v_checkpoint  # noqa: E402
from tessera.launch.config import resolve_config  # noqa: E402
from tessera.launch.generate import main  # noqa: E402
from tessera.models.family import LatentFormat  # noqa: E402
from tessera.models.wan.checkpoint import resolve_checkpoint  # noqa: E402
from tessera.models.wan.vae import WanVAEDecoder  # noqa: E402
from test_dmd import dmd_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPT, NEGATIVE = "a red fox running through fresh snow", "blurry low quality"
# 64x96 pixels at 16x spatial: a 4x6 latent grid, tokens (3, 2, 3) after the 2x2 patches
RUN = dict(num_frames=9, height=64, width=96, num_steps=3, guidance_scale=5.0, seed=3)
TI2V_LATENTS = LatentFormat(channels=48, spatial_stride=16, temporal_stride=4)
# Two ranks: the API under torchrun, rank 0 saving what it got (latents, frames, report) for the parent to compare.
_SPMD_SCRIPT = """
import sys, torch, tessera
ckpt, out, run = sys.argv[1], sys.argv[2], {RUN!r}
with tessera.load(model={{"path": ckpt}}, attention={{"backend": "dense"}}) as pipe:
    video = pipe.generate(prompt={PROMPT!r}, negative_prompt={NEGATIVE!r}, **run)
    if video.frames is not None:
        torch.save({{"latents": video.latents, "frames": torch.from_numpy(video.frames), "sp": video.report["sp"],
                    "decode_ranks": video.report["decode"]["ranks"]}}, out)
"""
# From an image at 2 ranks with VSA at sparsity 0 (exact) on a (4, 5, 4) token grid: the first frame's tokens are spread
# over the tile order and both shards.
_SPMD_IMAGE_SCRIPT = """
import sys, torch, tessera
ckpt, out, image, run = sys.argv[1], sys.argv[2], sys.argv[3], {RUN!r}
with tessera.load(model={{"path": ckpt}}, attention={{"backend": "vsa", "sparsity": 0.0}}) as pipe:
    video = pipe.generate(prompt={PROMPT!r}, negative_prompt={NEGATIVE!r}, image=image, **run)
    if video.frames is not None:
        torch.save({{"latents": video.latents, "sp": video.report["sp"], "image": video.report["image"],
                    "backend": video.report["attention"]["backend_per_block"][0]}}, out)
"""
IMAGE_RUN = dict(RUN, height=160, width=128, num_frames=13)  # latent (4, 10, 8) -> tokens (4, 5, 4): 2 partial tiles


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_ti2v_checkpoint(tmp_path_factory.mktemp("ti2v") / "Wan2.2-TI2V-tiny-Diffusers")


@pytest.fixture(scope="module")
def reference(ckpt):
    """diffusers WanPipeline (expand_timesteps from model_index.json): final latents and float frames ('np')."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(ckpt))
    assert pipe.config.expand_timesteps and pipe.vae_scale_factor_spatial == 16

    def run(output_type: str):
        return pipe(PROMPT, NEGATIVE, height=RUN["height"], width=RUN["width"], num_frames=RUN["num_frames"],
                    num_inference_steps=RUN["num_steps"], guidance_scale=RUN["guidance_scale"],
                    generator=torch.Generator("cpu").manual_seed(RUN["seed"]), output_type=output_type).frames

    return run("latent"), torch.from_numpy(run("np"))


def awkward_image(size=(75, 53)):
    """A PIL image of an awkward size (resized to the video's, as diffusers' VideoProcessor does) with structure."""
    from PIL import Image

    gen = np.random.default_rng(7)
    ramp = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    pixels = 0.6 * ramp + 0.4 * gen.uniform(0, 255, (size[1], size[0], 3)).astype(np.float32)
    return Image.fromarray(pixels.astype(np.uint8))


def i2v_reference(ckpt: Path, image, run: dict) -> torch.Tensor:
    """diffusers' WanImageToVideoPipeline with expand_timesteps (Wan2.2 TI2V, no image encoder): final latents."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v_module
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if not hasattr(i2v_module, "ftfy"):  # its prompt_clean calls ftfy unconditionally; ours skips it when absent
        i2v_module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    parts = WanPipeline.from_pretrained(str(ckpt)).components
    pipe = WanImageToVideoPipeline(**parts, expand_timesteps=True)
    return pipe(image, PROMPT, NEGATIVE, height=run["height"], width=run["width"], num_frames=run["num_frames"],
                num_inference_steps=run["num_steps"], guidance_scale=run["guidance_scale"],
                generator=torch.Generator("cpu").manual_seed(run["seed"]), output_type="latent").frames


def test_checkpoint_is_detected_as_ti2v(ckpt):
    info = resolve_checkpoint(ckpt)
    assert info.latents == TI2V_LATENTS and info.expand_timesteps and info.is_ti2v
    assert info.arch["in_channels"] == info.arch["out_channels"] == TI2V_Z_DIM
    cfg, _ = resolve_config([f"model.path={ckpt}"])
    assert cfg.output.fps == 24 and cfg.model.preset == "wan-tiny"  # no 5B-sized preset fits the tiny DiT
    assert resolve_config([f"model.path={ckpt}", "output.fps=30"])[0].output.fps == 30


def test_api_one_rank_matches_diffusers_pipeline(ckpt, reference):
    """Latents (fp32 rel 1e-4) and frames (our decode of our latents vs diffusers' 'np' frames, and the API's uint8
    frames within one level of diffusers' frames truncated as export_to_video does); from an image (a PIL image of an
    awkward size) the latents equal WanImageToVideoPipeline's, and a text-only request after it is text-only again."""
    import tessera

    ref_latents, ref_frames = reference
    image = awkward_image()
    with tessera.load(model={"path": str(ckpt)}, attention={"backend": "dense"}) as pipe:
        from_image = pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, **RUN)
        video = pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, **RUN)
    expected = i2v_reference(ckpt, image, RUN)
    assert from_image.latents.shape == expected.shape == ref_latents.shape
    assert rel_err(from_image.latents, expected) < 1e-4
    assert rel_err(from_image.latents, ref_latents) > 1e-2  # the image matters
    assert rel_err(from_image.latents[:, :, 1:], expected[:, :, 1:]) < 1e-4  # the denoised frames, not only frame 0
    assert from_image.report["image"]["size"] == [75, 53]
    assert video.latents.shape == ref_latents.shape == (1, TI2V_Z_DIM, 3, 4, 6)
    assert rel_err(video.latents, ref_latents) < 1e-4
    assert video.report["video"]["fps"] == 24 and video.report["token_grid"] == [3, 2, 3]
    frames = WanVAEDecoder(ckpt / "vae", device=torch.device("cpu")).decode_float(video.latents)
    assert frames.shape == ref_frames.shape == (1, 9, 64, 96, 3) and ref_frames.std() > 0.05
    assert (frames - ref_frames).abs().max().item() < 1e-3
    ref_uint8 = (ref_frames[0] * 255).to(torch.uint8)
    assert (torch.from_numpy(video.frames).int() - ref_uint8.int()).abs().max().item() <= 1


@pytest.mark.multirank
def test_two_ranks_match_diffusers_pipeline(ckpt, reference, tmp_path):
    """sp=2 over gloo: tokens sharded, the VAE rows decoded over both ranks and gathered on rank 0."""
    script, out = tmp_path / "spmd.py", tmp_path / "rank0.pt"
    script.write_text(_SPMD_SCRIPT.format(RUN=RUN, PROMPT=PROMPT, NEGATIVE=NEGATIVE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(ckpt), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out)
    ref_latents, ref_frames = reference
    assert got["sp"] == 2 and got["decode_ranks"] == 2
    assert rel_err(got["latents"], ref_latents) < 1e-4
    ref_uint8 = (ref_frames[0] * 255).to(torch.uint8)
    assert (got["frames"].int() - ref_uint8.int()).abs().max().item() <= 1


@pytest.mark.multirank
def test_two_ranks_vsa_from_an_image_match_diffusers_pipeline(ckpt, tmp_path):
    """sp=2 over gloo, VSA at sparsity 0 (tile order, partial tiles): the clean first-frame tokens are selected in
    each rank's shard of the tile order."""
    script, out, image = tmp_path / "spmd.py", tmp_path / "rank0.pt", tmp_path / "first_frame.png"
    awkward_image((90, 130)).save(image)
    script.write_text(_SPMD_IMAGE_SCRIPT.format(RUN=IMAGE_RUN, PROMPT=PROMPT, NEGATIVE=NEGATIVE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(ckpt), str(out), str(image)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out)
    assert got["sp"] == 2 and got["backend"] == ["vsa", "vsa"] and got["image"]["size"] == [90, 130]
    from diffusers.utils import load_image

    expected = i2v_reference(ckpt, load_image(str(image)), IMAGE_RUN)  # the file, read as diffusers reads it
    assert got["latents"].shape == expected.shape == (1, TI2V_Z_DIM, 4, 10, 8)
    assert rel_err(got["latents"], expected) < 1e-4


# --- FastWan2.2-TI2V-5B: the DMD sampler on the TI2V latent grid --------------------------------------------------


@pytest.fixture(scope="module")
def dmd_ckpt(ckpt, tmp_path_factory) -> Path:
    """The tiny TI2V checkpoint relabelled as FastVideo's (model_index.json: WanDMDPipeline)."""
    root = tmp_path_factory.mktemp("fastwan_ti2v") / "FastWan2.2-TI2V-tiny"
    shutil.copytree(ckpt, root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanDMDPipeline"}))
    return root


def test_fastwan_ti2v_matches_the_dmd_reference_and_runs_vsa(dmd_ckpt, tmp_path):
    """Dense (the checkpoint's default: no gate weights) equals the DMD reference to 1e-5; so does VSA at sparsity 0
    (every key tile, the zero-initialised gate: exact) on a (4, 5, 4) token grid (2 tiles, one partial: 5 = 4 + 1
    token rows), through the tile order, the padded tile layout and back."""
    run = dict(num_frames=9, height=64, width=96, seed=5)
    dense, vsa = tmp_path / "dense.mp4", tmp_path / "vsa.mp4"
    args = [f"model.path={dmd_ckpt}", f"prompt={PROMPT}", "output.save_latents=true",
            *(f"{k}={v}" for k, v in run.items())]
    assert main([*args, f"output.path={dense}"]) == 0
    report = json.loads(dense.with_suffix(".json").read_text())
    assert report["config"]["scheduler"] == "dmd" and report["attention"]["backend"] == "dense"
    assert report["config"]["output"]["fps"] == 24 and report["video"]["fps"] == 24
    expected = dmd_reference(dmd_ckpt, PROMPT, **run, latent_channels=TI2V_Z_DIM, spatial_stride=16)
    assert rel_err(load_file(str(dense.with_suffix(".latents.safetensors")))["latents"], expected) < 1e-5

    vsa_run = dict(num_frames=13, height=160, width=128, seed=5)
    vsa_args = [f"model.path={dmd_ckpt}", f"prompt={PROMPT}", "output.save_latents=true", f"output.path={vsa}",
                *(f"{k}={v}" for k, v in vsa_run.items()), "attention.backend=vsa", "attention.sparsity=0.0"]
    assert main(vsa_args) == 0
    report = json.loads(vsa.with_suffix(".json").read_text())
    assert report["token_grid"] == [4, 5, 4] and report["attention"]["backend_per_block"][0] == ["vsa", "vsa"]
    expected = dmd_reference(dmd_ckpt, PROMPT, **vsa_run, latent_channels=TI2V_Z_DIM, spatial_stride=16)
    assert rel_err(load_file(str(vsa.with_suffix(".latents.safetensors")))["latents"], expected) < 1e-5


# --- presets and defaults (headers only: a 5B-shaped checkpoint costs a few bytes) ----------------------------------

TI2V_5B = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=24,
               attention_head_dim=128, in_channels=48, out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336,
               num_layers=30, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)


def fake_5b(root: Path, pipeline_class: str, expand_timesteps: bool = True) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(TI2V_5B))
    save_file({"proj_out.bias": torch.zeros(1)}, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKLWan", "z_dim": 48, "is_residual": True, "patch_size": 2,
         "scale_factor_spatial": 16, "scale_factor_temporal": 4}))
    index = {"_class_name": pipeline_class, **({"expand_timesteps": True} if expand_timesteps else {})}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_5b_checkpoints_get_their_presets(tmp_path):
    base, _ = resolve_config([f"model.path={fake_5b(tmp_path / 'base', 'WanPipeline')}"])
    base.validate(world_size=1)
    assert base.model.preset == "wan2.2-ti2v-5b" and base.scheduler == "unipc"
    assert (base.height, base.width, base.num_frames, base.output.fps) == (704, 1280, 121, 24)
    assert (base.num_steps, base.guidance_scale, base.flow_shift) == (50, 5.0, 5.0)
    # FastVideo's model_index.json need not say expand_timesteps: the Wan2.2 VAE marks the family
    fast, _ = resolve_config([f"model.path={fake_5b(tmp_path / 'fast', 'WanDMDPipeline', expand_timesteps=False)}"])
    fast.validate(world_size=1)
    assert fast.model.preset == "fastwan2.2-ti2v-5b" and fast.scheduler == "dmd" and fast.num_steps == 3
    assert (fast.height, fast.width, fast.num_frames, fast.output.fps) == (704, 1280, 121, 24)
    assert (fast.guidance_scale, fast.attention.backend) == (1.0, "dense")


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "frame.png"
    Image.fromarray(np.full((64, 96, 3), 128, np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("args", "error", "needle"), [
    (["image={image}"], ValueError, "FastWan2.2-TI2V-5B .* text-to-video only. Fix: drop image"),
    (["height=48"], ValueError, "height=48 must be a multiple of 32 .* Fix: height=64"),
    (["width=80"], ValueError, "width=80 must be a multiple of 32"),
    (["output.fps=0"], ValueError, "output.fps=0 must be a positive whole number"),
    (["output.fps=2.5"], TypeError, "output.fps=2.5 must be a whole number"),
])
def test_bad_input_fails_before_any_weights_load(tmp_path, monkeypatch, capsys, args, error, needle):
    def fail(*a, **k):
        raise AssertionError("a model was built before the input error")

    monkeypatch.setattr("tessera.models.wan.family.build_wan_on_meta", fail)
    root = fake_5b(tmp_path / "fast", "WanDMDPipeline")
    argv = [f"model.path={root}", *(a.format(image=_image(tmp_path)) for a in args)]
    with pytest.raises(error, match=needle):
        cfg, _ = resolve_config(argv)
        cfg.validate(world_size=1)
    assert main([*argv, f"output.path={tmp_path / 'v.mp4'}"]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "v.mp4").exists()


def test_the_base_ti2v_takes_an_image_or_none(tmp_path):
    root = fake_5b(tmp_path / "base", "WanPipeline")
    image = _image(tmp_path)
    cfg, _ = resolve_config([f"model.path={root}", f"image={image}"])
    cfg.validate(world_size=1)
    assert cfg.image == str(image) and cfg.model.preset == "wan2.2-ti2v-5b"
    assert resolve_config([f"model.path={root}"])[0].image is None
