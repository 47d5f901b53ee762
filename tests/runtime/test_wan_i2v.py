"""Wan2.1 image-to-video on a tiny random I2V checkpoint (CPU, fp32) against diffusers' WanImageToVideoPipeline.

The DiT with its image branch, the final latents (1 rank through the Python API, 2 ranks through torchrun + gloo),
the decoded frames, native weight names, checkpoint detection, and every bad-input error before any weight loads.
"""

from __future__ import annotations

import base64
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

from _runs import ARGS, NEGATIVE, PROMPT, RUN, rel_err  # noqa: E402
from _wan_checkpoint import IMAGE_DIM, write_i2v_checkpoint, write_native_copy  # noqa: E402
from tessera.launch.config import resolve_config  # noqa: E402
from tessera.launch.generate import main  # noqa: E402
from tessera.models.wan import WanConfig, build_wan_on_meta, load_wan_weights_  # noqa: E402
from tessera.models.wan.checkpoint import resolve_checkpoint  # noqa: E402
from tessera.models.wan.vae import WanVAEDecoder  # noqa: E402
from tessera.runtime.image_conditioning import aspect_warning, request_image_path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_i2v_checkpoint(tmp_path_factory.mktemp("wan_i2v") / "Wan2.1-I2V-tiny-Diffusers")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    """A 72x48 RGB PNG (the video's 3:2 aspect: no stretch warning), smooth ramps plus noise."""
    from PIL import Image

    y, x = np.mgrid[0:48, 0:72]
    noise = np.random.default_rng(0).integers(0, 64, (48, 72, 3))
    pixels = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1) + noise
    path = tmp_path_factory.mktemp("img") / "first_frame.png"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def reference(ckpt, image_file):
    """diffusers WanImageToVideoPipeline: final latents (output_type='latent') and float frames ('np')."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v_module
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    if not hasattr(i2v_module, "ftfy"):  # its prompt_clean calls ftfy unconditionally; ours skips it when absent
        i2v_module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    pipe = WanImageToVideoPipeline.from_pretrained(str(ckpt))
    image = Image.open(image_file).convert("RGB")

    def run(output_type: str):
        return pipe(image, PROMPT, NEGATIVE, height=RUN["height"], width=RUN["width"], num_frames=RUN["num_frames"],
                    num_inference_steps=RUN["num_steps"], guidance_scale=RUN["guidance_scale"],
                    generator=torch.Generator("cpu").manual_seed(RUN["seed"]), output_type=output_type).frames

    return run("latent"), torch.from_numpy(run("np"))


@pytest.fixture
def no_weight_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was built before the input error")

    monkeypatch.setattr("tessera.models.wan.family.build_wan_on_meta", fail)


def test_checkpoint_is_detected_as_image_to_video(ckpt):
    info = resolve_checkpoint(ckpt)
    assert info.pipeline_class == "WanImageToVideoPipeline"
    assert info.image_encoder == ckpt / "image_encoder" and info.image_processor == ckpt / "image_processor"
    assert (info.arch["in_channels"], info.arch["image_dim"], info.arch["added_kv_proj_dim"]) == (36, IMAGE_DIM, 32)


def test_transformer_with_image_branch_matches_diffusers(ckpt, tmp_path):
    """Diffusers names and the native Wan I2V names (img_emb.proj.*, cross_attn.k_img ...) load the same DiT."""
    from diffusers import WanTransformer3DModel

    info = resolve_checkpoint(ckpt)
    ours = build_wan_on_meta(WanConfig(**info.arch))
    load_wan_weights_(ours, info.weights, device="cpu", dtype=torch.float32)
    native = build_wan_on_meta(WanConfig(**info.arch))
    report = load_wan_weights_(native, write_native_copy(ckpt, tmp_path / "native") / "transformer", "cpu",
                               torch.float32)
    assert report.layout == "native"
    for (name, param), (_, native_param) in zip(ours.named_parameters(), native.named_parameters(), strict=True):
        assert torch.equal(param, native_param), name
    theirs = WanTransformer3DModel.from_pretrained(str(ckpt / "transformer")).eval()
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 36, 3, 4, 6, generator=gen), torch.tensor([999, 411])
    text = torch.randn(2, 512, info.arch["text_dim"], generator=gen)  # diffusers splits image tokens at L - 512
    image = torch.randn(2, 5, IMAGE_DIM, generator=gen)
    with torch.no_grad():
        expected = theirs(x, t, text, encoder_hidden_states_image=image, return_dict=False)[0]
        got = ours.eval()(x, t, text, image)
    assert rel_err(got, expected) < 1e-5


def test_api_one_rank_matches_diffusers_pipeline(ckpt, image_file, reference):
    """Latents (fp32 rel 1e-4) and frames. Frames: our VAE decode of our latents vs diffusers' 'np' frames within
    1e-3 (the latents differ by ~1e-6 relative, so the frames by far less than one uint8 level, 1/255 = 3.9e-3), and
    the API's uint8 frames within one level of diffusers' frames converted as export_to_video does (truncation can
    round a value that sits on a level boundary either way)."""
    import tessera

    ref_latents, ref_frames = reference
    with tessera.load(model={"path": str(ckpt)}, attention={"backend": "dense"}) as pipe:
        video = pipe.generate(image=str(image_file), prompt=PROMPT, negative_prompt=NEGATIVE, **RUN)
        from PIL import Image

        same = pipe.generate(image=np.asarray(Image.open(image_file)), prompt=PROMPT, negative_prompt=NEGATIVE, **RUN)
    assert rel_err(video.latents, ref_latents) < 1e-4
    assert torch.equal(same.latents, video.latents)  # an array is the same first frame as its file
    assert video.report["image"]["size"] == [72, 48] and video.report["image"]["aspect_warning"] is None
    assert same.report["image"]["source"] == "ndarray"
    frames = WanVAEDecoder(ckpt / "vae", device=torch.device("cpu")).decode_float(video.latents)
    assert frames.shape == ref_frames.shape == (1, 9, 32, 48, 3)
    assert (frames - ref_frames).abs().max().item() < 1e-3
    ref_uint8 = (ref_frames[0] * 255).to(torch.uint8)
    assert video.frames.shape == (9, 32, 48, 3)
    assert (torch.from_numpy(video.frames).int() - ref_uint8.int()).abs().max().item() <= 1


@pytest.mark.multirank
@pytest.mark.parametrize("parallel", ["sp", "cfg"])
def test_two_ranks_match_diffusers_pipeline(ckpt, image_file, reference, tmp_path, parallel):
    """launch/generate.py under torchrun (gloo), the tokens (sp=2) or the CFG branches (cfg=2) over two ranks: rank 0
    encodes the image and broadcasts the condition, every rank concatenates it."""
    out = tmp_path / f"{parallel}2.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "generate.py"), *ARGS, f"model.path={ckpt}", f"image={image_file}",
           f"output.path={out}", f"parallel.{parallel}=2", *(["parallel.sp=1"] if parallel == "cfg" else [])]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    latents = load_file(str(out.with_suffix(".latents.safetensors")))["latents"]
    assert rel_err(latents, reference[0]) < 1e-4
    report = json.loads(out.with_suffix(".json").read_text())
    assert report[parallel] == 2 and report["config"]["image"] == str(image_file)


@pytest.mark.parametrize(("folder", "preset", "size", "shift"), [
    ("Wan2.1-I2V-14B-480P-Diffusers", "wan2.1-i2v-14b-480p", (480, 832), 3.0),
    ("Wan2.1-I2V-14B-720P-Diffusers", "wan2.1-i2v-14b-720p", (720, 1280), 5.0),
])
def test_14b_i2v_checkpoint_gets_its_preset(tmp_path, folder, preset, size, shift):
    """Headers only (a few bytes): the I2V 14B architecture picks the I2V preset, the folder name its resolution."""
    root = tmp_path / folder
    config = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=40,
                  attention_head_dim=128, in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                  num_layers=40, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024, image_dim=1280,
                  added_kv_proj_dim=5120, pos_embed_seq_len=None)
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    save_file({"blocks.0.attn2.add_k_proj.weight": torch.zeros(1)}, str(root / "transformer" / "x.safetensors"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    cfg, arch = resolve_config([f"model.path={root}"])
    assert cfg.model.preset == preset and (cfg.height, cfg.width, cfg.num_frames) == (*size, 81)
    assert (cfg.flow_shift, cfg.guidance_scale, arch.image_dim, arch.in_channels) == (shift, 5.0, 1280, 36)


# --- bad inputs: clear errors before any weights load -----------------------------------------------------------


def run_main(tmp_path: Path, *args: str) -> tuple[int, Path]:
    out = tmp_path / "v.mp4"
    return main([*ARGS, f"output.path={out}", *args]), out


def test_image_for_a_text_only_model_fails_before_loading(image_file, tmp_path, no_weight_load, capsys):
    rc, out = run_main(tmp_path, f"image={image_file}")  # the default preset, wan-tiny, is text-to-video
    err = capsys.readouterr().err
    assert rc == 2 and "text-to-video model" in err and "Fix: drop image" in err
    assert not out.exists()


def test_missing_image_for_an_i2v_checkpoint_fails_before_loading(ckpt, tmp_path, no_weight_load, capsys):
    rc, _ = run_main(tmp_path, f"model.path={ckpt}")
    err = capsys.readouterr().err
    assert rc == 2 and "image is missing" in err and "image=" in err


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), (b"not an image", "cannot be read")])
def test_bad_image_file_fails_before_loading(ckpt, tmp_path, no_weight_load, capsys, content, needle):
    path = tmp_path / "frame.png"
    if content is not None:
        path.write_bytes(content)
    rc, _ = run_main(tmp_path, f"model.path={ckpt}", f"image={path}")
    err = capsys.readouterr().err
    assert rc == 2 and f"image={path}" in err and needle in err


def test_missing_image_encoder_is_named_before_loading(ckpt, image_file, tmp_path, no_weight_load, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    shutil.rmtree(broken / "image_encoder")
    rc, _ = run_main(tmp_path, f"model.path={broken}", f"image={image_file}")
    err = capsys.readouterr().err
    assert rc == 2 and "image_encoder/" in err and str(broken) in err


def test_api_refuses_an_image_for_a_text_only_model_before_any_work(monkeypatch):
    import tessera

    with tessera.load(attention={"backend": "dense"}) as pipe:  # wan-tiny: random weights, text-to-video
        monkeypatch.setattr(pipe._pipe, "_generate", lambda *a, **k: pytest.fail("the request started"))
        with pytest.raises(ValueError, match="text-to-video model"):
            pipe.generate(image=np.zeros((16, 16, 3), np.uint8), num_steps=1)


def test_aspect_warning_threshold():
    assert aspect_warning((72, 48), 32, 48) is None  # the same aspect
    assert aspect_warning((1280, 720), 480, 832) is None  # 16:9 for 832x480: x1.03
    message = aspect_warning((640, 480), 480, 832)  # 4:3 for 832x480: x1.30 > 1.2
    assert message is not None and "stretches it 1.30x" in message and "height=544 width=736" in message


def test_server_image_field_path_or_base64(image_file, tmp_path):
    data = base64.b64encode(image_file.read_bytes()).decode()
    assert request_image_path(str(image_file), tmp_path / "a.image") == str(image_file)
    saved = Path(request_image_path(data, tmp_path / "b.image"))
    assert saved == tmp_path / "b.image.png" and saved.read_bytes() == image_file.read_bytes()
    saved = Path(request_image_path(f"data:image/png;base64,{data}", tmp_path / "c.image"))
    assert saved.read_bytes() == image_file.read_bytes()
    with pytest.raises(ValueError, match="neither a file on the server nor base64"):
        request_image_path("/no/such/file.png", tmp_path / "d.image")
    with pytest.raises(ValueError, match="not an image"):
        request_image_path(base64.b64encode(b"plain text").decode(), tmp_path / "e.image")
