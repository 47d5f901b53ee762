"""The Python API (`tessera.load` / `generate` / `Video.save`) and `prompts_file=`: one model, many videos.

Same schema and errors as the CLI, bit-identical latents to the CLI for the same request (CPU fp32), weights and
text embeddings reused across requests, SPMD under torchrun, one import name that a user's own `models/` folder
cannot shadow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio.v3 as iio
import pytest
import tessera
import torch
from safetensors.torch import load_file
from tessera.launch.config import resolve_config
from tessera.launch.generate import main

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(num_frames=13, height=64, width=80, num_steps=2)
SMALL_ARGS = [f"{k}={v}" for k, v in SMALL.items()]


@pytest.fixture(scope="module")
def pipe():
    with tessera.load(model={"preset": "wan-tiny"}, attention={"backend": "vsa", "sparsity": 0.5}, **SMALL) as p:
        yield p


def test_api_equals_cli_bit_for_bit(tmp_path, pipe):
    out = tmp_path / "cli.mp4"
    args = [*SMALL_ARGS, "attention.backend=vsa", "attention.sparsity=0.5", "seed=3", "prompt=a red fox in snow",
            f"output.path={out}", "output.save_latents=true"]
    assert main(args) == 0
    cli = load_file(str(out.with_suffix(".latents.safetensors")))["latents"]
    video = pipe.generate(prompt="a red fox in snow", seed=3)
    assert video.latents.dtype == torch.float32 and video.latents.shape == cli.shape
    assert torch.equal(video.latents, cli)
    assert video.frames.shape == (13, 64, 80, 3) and video.frames.dtype.name == "uint8"
    # the mp4 is H.264 (lossy): its frames are close to the API's exact ones, not equal (the tiny preview's 8x8
    # colour blocks are hard content: ~4.8 levels mean at the default output.encoder_preset=veryfast, ~3.6 at medium)
    assert abs(video.frames.astype(float) - iio.imread(out).astype(float)).mean() < 6


def test_second_request_reuses_weights_and_embeddings(pipe):
    model, cache = pipe._pipe.model, pipe._pipe.metadata_cache
    first = pipe.generate(prompt="one prompt", seed=1)
    again = pipe.generate(prompt="one prompt", seed=1, attention={"sparsity": 0.5})
    other = pipe.generate(prompt="one prompt", seed=2, num_steps=3)
    assert pipe._pipe.model is model and pipe._pipe.metadata_cache is cache
    assert again.report["stage_seconds"]["load"] == 0.0
    assert torch.equal(first.latents, again.latents) and not torch.equal(first.latents, other.latents)
    assert len(other.report["step_seconds"]) == 3


@pytest.mark.parametrize(("keys", "exc"), [
    (dict(num_step=3), ValueError), (dict(seed="abc"), TypeError), (dict(attention={"sparsity": 1.5}), ValueError),
    (dict(num_frames=10), ValueError),
])
def test_bad_keys_raise_the_cli_errors(pipe, keys, exc):
    with pytest.raises(exc) as api_err:
        pipe.generate(**keys)
    cli_args = [f"{k}={v}" if not isinstance(v, dict) else f"{k}.{next(iter(v))}={next(iter(v.values()))}"
                for k, v in keys.items()]
    with pytest.raises(exc) as cli_err:
        cfg, _ = resolve_config(cli_args)
        cfg.validate(world_size=1)
    assert str(api_err.value) == str(cli_err.value)


def test_load_time_groups_are_fixed(pipe):
    with pytest.raises(ValueError, match="model.* is fixed"):
        pipe.generate(model={"dtype": "bfloat16"})
    with pytest.raises(ValueError, match="attention.backend"):
        tessera.load(attention={"backend": "sparse"})


def test_save_writes_atomically_with_the_overwrite_rule(tmp_path, pipe):
    video = pipe.generate(prompt="a fox", seed=4)
    path = video.save(tmp_path / "fox.mp4", save_latents=True)
    assert path == tmp_path / "fox.mp4" and iio.imread(path).shape == (13, 64, 80, 3)
    report = json.loads((tmp_path / "fox.json").read_text())
    assert report["config"]["seed"] == 4 and report["video"]["path"] == str(path)
    assert torch.equal(load_file(str(tmp_path / "fox.latents.safetensors"))["latents"], video.latents)
    with pytest.raises(ValueError, match="output.overwrite"):
        video.save(tmp_path / "fox.mp4")
    video.save(tmp_path / "fox.mp4", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.json", "fox.latents.safetensors", "fox.mp4"]


def test_a_users_own_models_folder_does_not_shadow_tessera(tmp_path):
    for name in ("models", "runtime", "attention"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the notebook folder was imported')\n")
    code = ("import tessera; p = tessera.load(num_frames=5, height=32, width=32, num_steps=1); "
            "print(p.generate(prompt='x').frames.shape)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(5, 32, 32, 3)" in proc.stdout


@pytest.mark.multirank
def test_api_under_torchrun_is_spmd_and_equals_one_rank(tmp_path):
    script = tmp_path / "api_job.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch, tessera
        with tessera.load(attention={{"backend": "vsa", "sparsity": 0.5}}, num_frames=13, height=64,
                          width=80, num_steps=2) as pipe:
            video = pipe.generate(prompt="a red fox", seed=5)
            rank = int(os.environ.get("RANK", "0"))
            torch.save(video.latents, r"{tmp_path}/latents-%s-%d.pt" % (os.environ.get("WORLD_SIZE", "1"), rank))
            assert (video.frames is None) == (rank != 0)
            assert (video.save(r"{tmp_path}/v-%s.mp4" % os.environ.get("WORLD_SIZE", "1")) is None) == (rank != 0)
    """))
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), ], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "latents-1-0.pt")
    for rank in (0, 1):
        two = torch.load(tmp_path / f"latents-2-{rank}.pt")
        assert ((two - one).norm() / one.norm()).item() < 1e-5
    assert sorted(p.name for p in tmp_path.glob("v-*.mp4")) == ["v-1.mp4", "v-2.mp4"]


def test_prompts_file_loads_once_and_writes_one_video_per_line(tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red fox in snow\n# a comment\n\n{"prompt": "a grey wolf", "seed": 9, "num_steps": 1}\n')
    caplog.set_level("INFO", logger="tessera")
    assert main([*SMALL_ARGS, f"prompts_file={prompts}", f"output.path={tmp_path / 'run.mp4'}"]) == 0
    assert sorted(p.name for p in tmp_path.glob("run-*")) == ["run-001.json", "run-001.mp4", "run-002.json",
                                                               "run-002.mp4"]
    first, second = (json.loads((tmp_path / f"run-00{i}.json").read_text()) for i in (1, 2))
    assert first["config"]["prompt"] == "a red fox in snow" and first["config"]["seed"] == 0
    assert second["config"]["prompt"] == "a grey wolf" and second["config"]["seed"] == 9
    assert len(second["step_seconds"]) == 1
    assert sum("weights loaded" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(("content", "needle"), [
    ('a fox\n{"prompt": "b", "num_step": 3}\n', "line 2: unknown config key 'num_step'"),
    ('a fox\n{"prompt": "b", "seed": "x"}\n', "line 2: seed=x must be a whole number"),
    ('{"prompt": "b", "model": {"dtype": "bfloat16"}}\n', "line 1: model.*, parallel.*"),
    ("{not json\n", "line 1: not valid JSON"),
    ("# only a comment\n", "holds no prompt"),
])
def test_bad_prompts_file_fails_before_loading(tmp_path, capsys, content, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text(content)
    assert main([*SMALL_ARGS, f"prompts_file={prompts}", f"output.path={tmp_path / 'o.mp4'}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("error:") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["p.txt"]


def test_offloaded_text_encoder_gives_the_same_video(pipe):
    """`model.offload_text_encoder`: the encoder waits in host memory between requests; the embeddings are the same."""
    with tessera.load(model={"preset": "wan-tiny", "offload_text_encoder": True},
                      attention={"backend": "vsa", "sparsity": 0.5}, **SMALL) as offloaded:
        for prompt in ("a fox", "a wolf"):  # the second prompt is encoded after the first request
            assert torch.equal(offloaded.generate(prompt=prompt, seed=2).latents,
                               pipe.generate(prompt=prompt, seed=2).latents)
        assert offloaded._pipe._text_encoder.device == torch.device("cpu")


@pytest.mark.gpu
def test_offloaded_text_encoder_leaves_the_gpu_between_requests(tmp_path):
    import sys as _sys

    sys_path = str(Path(__file__).resolve().parents[1] / "runtime")
    if sys_path not in _sys.path:
        _sys.path.insert(0, sys_path)
    from _wan_checkpoint import write_diffusers_checkpoint

    ckpt = write_diffusers_checkpoint(tmp_path / "ckpt")
    with tessera.load(model={"path": str(ckpt), "offload_text_encoder": True}, **SMALL) as gpu_pipe:
        encoder = gpu_pipe._pipe._text_encoder
        assert next(encoder.model.parameters()).device.type == "cpu"  # offloaded right after the load's prompts
        video = gpu_pipe.generate(prompt="a red fox", seed=1)
        assert next(encoder.model.parameters()).device.type == "cpu" and video.frames is not None
