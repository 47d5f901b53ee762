"""Real-checkpoint parity on a tiny random Wan2.1 checkpoint in diffusers format (CPU, fp32).

Our DiT, `launch/generate.py model.path=<dir>` (1 rank in process, 2 ranks with torchrun/gloo), the decoded
frames and a native-format copy of the weights all match diffusers' WanTransformer3DModel / WanPipeline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from _runs import ARGS, NEGATIVE, PROMPT, RUN, latents_of, rel_err  # noqa: E402
from _wan_checkpoint import FLOW_SHIFT, write_diffusers_checkpoint, write_native_copy  # noqa: E402
from tessera.launch.generate import main  # noqa: E402
from tessera.models.wan import WanConfig, build_wan_on_meta, load_wan_weights_  # noqa: E402
from tessera.models.wan.checkpoint import resolve_checkpoint  # noqa: E402
from tessera.models.wan.vae import WanVAEDecoder  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_diffusers_checkpoint(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers")


@pytest.fixture(scope="module")
def reference(ckpt):
    """diffusers WanPipeline on the checkpoint: final latents and float frames in [0, 1] [B, T, H, W, 3]."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(ckpt))
    captured = {}

    def keep_latents(pipe, step, t, kwargs):
        captured["latents"] = kwargs["latents"].clone()
        return {}

    frames = pipe(
        PROMPT, NEGATIVE, height=RUN["height"], width=RUN["width"], num_frames=RUN["num_frames"],
        num_inference_steps=RUN["num_steps"], guidance_scale=RUN["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(RUN["seed"]), output_type="np",
        callback_on_step_end=keep_latents,
    ).frames
    return captured["latents"], torch.from_numpy(frames)


def run_main(tmp_path: Path, name: str, path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / f"{name}.mp4"
    return main([*ARGS, f"model.path={path}", f"output.path={out}", *extra]), out


def test_transformer_matches_diffusers(ckpt):
    from diffusers import WanTransformer3DModel

    info = resolve_checkpoint(ckpt)
    assert info.kind == "diffusers" and info.flow_shift == FLOW_SHIFT
    ours = build_wan_on_meta(WanConfig(**info.arch))
    load_wan_weights_(ours, info.weights, device="cpu", dtype=torch.float32)
    theirs = WanTransformer3DModel.from_pretrained(str(ckpt / "transformer")).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 6, generator=gen)
    t = torch.tensor([999, 411])
    text = torch.randn(2, 7, info.arch["text_dim"], generator=gen)
    with torch.no_grad():
        expected = theirs(x, t, text, return_dict=False)[0]
        got = ours.eval()(x, t, text)
    assert rel_err(got, expected) < 1e-5


def test_generate_one_rank_matches_diffusers_pipeline(ckpt, reference, tmp_path):
    ref_latents, ref_frames = reference
    rc, out = run_main(tmp_path, "one", ckpt)
    assert rc == 0
    assert rel_err(latents_of(out), ref_latents) < 1e-4
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["config"]["flow_shift"] == FLOW_SHIFT  # from scheduler/scheduler_config.json
    assert report["architecture"]["num_layers"] == 2  # from transformer/config.json, not the preset
    assert report["conditioning"] == {"text_encoder": "umt5", "decoder": "wan-vae"}

    # Decoded frames: our VAE decoder on our latents vs diffusers' 'np' frames (float and uint8).
    decoder = WanVAEDecoder(ckpt / "vae", device=torch.device("cpu"))
    frames = decoder.decode_float(latents_of(out))
    assert frames.shape == ref_frames.shape == (1, 9, 32, 48, 3)
    assert (frames - ref_frames).abs().max().item() < 1e-3
    ref_uint8 = (ref_frames * 255).to(torch.uint8)  # diffusers' export_to_video conversion
    assert (decoder.decode(latents_of(out)).int() - ref_uint8.int()).abs().max().item() <= 1


def test_flow_shift_override_wins(ckpt, tmp_path):
    rc, out = run_main(tmp_path, "shift", ckpt, "flow_shift=5.0", "num_steps=1")
    assert rc == 0
    assert json.loads(out.with_suffix(".json").read_text())["config"]["flow_shift"] == 5.0


def test_native_copy_gives_same_latents(ckpt, reference, tmp_path):
    native = write_native_copy(ckpt, tmp_path / "native")
    assert resolve_checkpoint(native).kind == "diffusers"  # native DiT names inside a diffusers directory
    rc, out = run_main(tmp_path, "native", native)
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["weights"]["weights"] == str(native)
    assert rel_err(latents_of(out), reference[0]) < 1e-4


@pytest.mark.multirank
def test_generate_two_ranks_matches_diffusers_pipeline(ckpt, reference, tmp_path):
    out = tmp_path / "sp2.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "generate.py"), *ARGS, f"model.path={ckpt}", f"output.path={out}", "parallel.sp=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert rel_err(latents_of(out), reference[0]) < 1e-4
    assert json.loads(out.with_suffix(".json").read_text())["decode"]["ranks"] == 2  # both ranks decoded


@pytest.mark.multirank
def test_two_ranks_decode_in_parallel_to_diffusers_frames(ckpt, reference, tmp_path):
    """The Python API under torchrun (2 ranks): the VAE decodes split over both, rank 0 gathers the frames."""
    keys = {"load": {"model": {"path": str(ckpt)}, "attention": {"backend": "dense"}, "parallel": {"sp": 2}},
            "generate": {**RUN, "prompt": PROMPT, "negative_prompt": NEGATIVE}}
    out = tmp_path / "api_sp2.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "runtime" / "_generate_job.py"), json.dumps(keys), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)  # the report: plain Python containers
    assert result["report"]["decode"]["ranks"] == 2
    assert rel_err(result["latents"], reference[0]) < 1e-4
    ref_uint8 = (reference[1][0] * 255).to(torch.uint8)  # diffusers' export_to_video conversion
    assert result["frames"].shape == ref_uint8.shape == (9, 32, 48, 3)
    assert (result["frames"].int() - ref_uint8.int()).abs().max().item() <= 1


def _fail_if_loading(*args, **kwargs):
    raise AssertionError("weights were loaded before the checkpoint error")


def test_missing_text_encoder_fails_before_weight_load(ckpt, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    shutil.rmtree(broken / "text_encoder")
    monkeypatch.setattr("tessera.models.wan.family.load_wan_weights_", _fail_if_loading)
    rc, out = run_main(tmp_path, "broken", broken)
    err = capsys.readouterr().err
    assert rc == 2 and "text_encoder/" in err and str(broken) in err
    assert not out.exists()


def test_missing_extra_names_the_install_command(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    monkeypatch.setattr("tessera.models.wan.family.load_wan_weights_", _fail_if_loading)
    rc, _ = run_main(tmp_path, "noextra", ckpt)
    assert rc == 2 and 'pip install -e ".[wan]"' in capsys.readouterr().err


def test_explicit_preset_with_other_architecture_is_an_error(ckpt, tmp_path, capsys):
    rc, _ = run_main(tmp_path, "mismatch", ckpt, "model.preset=wan2.1-t2v-1.3b")
    err = capsys.readouterr().err
    assert rc == 2 and "model.preset=wan2.1-t2v-1.3b" in err and "num_layers: preset 30 vs checkpoint 2" in err


def test_incomplete_diffusers_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    (tmp_path / "half" / "model_index.json").write_text("{}")
    rc, _ = run_main(tmp_path, "half", tmp_path / "half")
    assert rc == 2 and "transformer/config.json" in capsys.readouterr().err
