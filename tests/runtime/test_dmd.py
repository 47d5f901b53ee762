"""FastWan's DMD sampler: the shift-8 sigma table, the noise draws, config and checkpoint defaults, and the final
latents of a tiny `WanDMDPipeline` checkpoint against an independent reference written from the semantics
(diffusers' WanTransformer3DModel + the checkpoint's UMT5), at 1 rank and 2 ranks (torchrun/gloo), dense and VSA.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _runs import latents_of, rel_err
from safetensors.torch import load_file, save_file
from tessera.launch.config import resolve_config
from tessera.launch.generate import main
from tessera.runtime.pipeline import request_prompts
from tessera.runtime.samplers import DMDSampler, build_sampler, dmd_sigma_table, draw_dmd_noise
from tessera.runtime.scheduler import draw_initial_noise

REPO = Path(__file__).resolve().parents[2]
FASTWAN = (1000, 757, 522)
PROMPT = "a red fox running through fresh snow"
DENSE_RUN = dict(num_frames=9, height=32, width=48, seed=3)  # token grid (3, 2, 3)
VSA_RUN = dict(num_frames=17, height=128, width=96, seed=5)  # token grid (5, 8, 6): 8 tiles, partial ones


def f32_bits(x: torch.Tensor | float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


# --- the sigma table and the sampler --------------------------------------------------------------------------


def test_sigma_table_equals_diffusers_flow_match_euler_shift8():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=8.0)
    sigmas, grid_t = dmd_sigma_table()
    assert sigmas.dtype == grid_t.dtype == torch.float32 and sigmas.shape == (1000,)
    assert torch.equal(sigmas.view(torch.int32), ref.sigmas.view(torch.int32))  # bit for bit
    assert torch.equal(grid_t.view(torch.int32), ref.timesteps.view(torch.int32))


def test_fastwan_timesteps_and_sigmas():
    sampler = DMDSampler(FASTWAN, seed=0)
    assert sampler.timesteps.dtype == torch.int64 and sampler.timesteps.tolist() == list(FASTWAN)  # the DiT sees t
    assert sampler.num_steps == 3 and not sampler.uses_cfg
    assert [f32_bits(s) for s in sampler.sigmas] == [0x3F800000, 0x3F41BACF, 0x3F0590B2, 0]
    assert sampler.describe()["sigmas"] == pytest.approx([1.0, 0.75675672, 0.52173913], abs=1e-8)


def test_sigma_is_the_nearest_table_entry_not_shifted_again():
    sigmas, grid_t = dmd_sigma_table()
    for t in (1, 2, 500, 999):
        expected = sigmas[torch.argmin((grid_t.double() - t).abs())]
        assert DMDSampler([t], seed=0).sigmas[0] == expected
    # A shift applied to t again would give 8s/(1+7s) of s = t/1000 = 0.5, i.e. 0.889, not ~0.5.
    assert abs(DMDSampler([500], seed=0).sigmas[0].item() - 0.5) < 1e-3


def test_ties_pick_the_first_index():
    from tessera.runtime.samplers import _nearest_indices

    grid = torch.tensor([3.0, 2.0, 1.0])
    assert _nearest_indices(grid, torch.tensor([2.5, 1.5, 3.0])).tolist() == [0, 1, 0]


def test_dmd_noise_is_drawn_frames_before_channels():
    gen = torch.Generator("cpu").manual_seed(11)
    noise = draw_dmd_noise(gen, (1, 16, 3, 4, 5))
    expected = torch.randn((1, 3, 16, 4, 5), generator=torch.Generator("cpu").manual_seed(11)).permute(0, 2, 1, 3, 4)
    assert noise.shape == (1, 16, 3, 4, 5) and noise.dtype == torch.float32 and noise.is_contiguous()
    assert torch.equal(noise, expected)
    assert not torch.equal(noise, draw_initial_noise(1, 9, 32, 40, 11))  # WanPipeline's order differs


def test_sampler_steps_follow_the_semantics():
    """Initial draw + one draw after every step but the last, from one generator; x0 in float64; re-noise fp32."""
    seed, shape = 21, (1, 16, 3, 4, 5)
    sampler = DMDSampler([1000, 800, 400, 100], seed=seed)
    x = sampler.initial_noise(1, 9, 32, 40)
    gen = torch.Generator("cpu").manual_seed(seed)
    assert torch.equal(x, draw_dmd_noise(gen, shape))
    sampler.prepare("cpu", torch.float32)
    sigma = sampler.sigmas
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) / 4
    for i in range(4):
        v = torch.einsum("oc,bcfhw->bofhw", w, x) * (1 + i)  # any velocity field
        x0 = (x.double() - sigma[i].double() * v.double()).float()
        expected = x0 if i == 3 else (1 - sigma[i + 1]) * x0 + sigma[i + 1] * draw_dmd_noise(gen, shape)
        x_ours = sampler.step(v, i, x)
        assert x_ours.dtype == torch.float32 and torch.equal(x_ours, expected)
        x = x_ours
    with pytest.raises(RuntimeError, match="reset"):
        sampler.initial_noise(1, 9, 32, 40)  # a request draws once
    sampler.reset()
    assert torch.equal(sampler.initial_noise(1, 9, 32, 40), draw_dmd_noise(torch.Generator().manual_seed(seed), shape))


def test_sampler_rejects_bad_input():
    for bad in ([], [757, 1000], [1000, 1000], [1001, 500], [500, 0], [500.0], [True]):
        with pytest.raises((ValueError, TypeError), match="dmd_timesteps"):
            DMDSampler(bad, seed=0)
    with pytest.raises(ValueError, match="batch 1"):
        DMDSampler(FASTWAN, seed=0).initial_noise(2, 9, 32, 32)
    with pytest.raises(RuntimeError, match="initial_noise"):
        DMDSampler(FASTWAN, seed=0).prepare("cpu", torch.float32)


def test_build_sampler_ignores_flow_shift_and_uses_one_prompt():
    cfg, _ = resolve_config(["scheduler=dmd", "flow_shift=3.0", "negative_prompt=blurry"])
    other, _ = resolve_config(["scheduler=dmd", "flow_shift=5.0"])
    a, b = build_sampler(cfg), build_sampler(other)
    assert isinstance(a, DMDSampler) and torch.equal(a.sigmas, b.sigmas)  # shift 8 whatever flow_shift says
    assert request_prompts(cfg) == [cfg.prompt]  # no CFG: no negative prompt is encoded
    unipc, _ = resolve_config(["seed=4"])
    noise = build_sampler(unipc).initial_noise(1, 9, 32, 32)
    assert torch.equal(noise, draw_initial_noise(1, 9, 32, 32, 4))  # WanPipeline's draw kept for unipc/euler


# --- config -----------------------------------------------------------------------------------------------------


def test_dmd_sets_steps_and_turns_cfg_off():
    cfg, _ = resolve_config(["scheduler=dmd"])  # wan-tiny's preset says 8 steps, guidance 5
    cfg.validate(world_size=1)
    assert (cfg.num_steps, cfg.guidance_scale, list(cfg.dmd_timesteps)) == (3, 1.0, list(FASTWAN))
    cfg, _ = resolve_config(["scheduler=dmd", "dmd_timesteps=[999,500]", "attention.sparsity=[0.5,0.9]"])
    cfg.validate(world_size=1)
    assert cfg.num_steps == 2 and build_sampler(cfg).timesteps.tolist() == [999, 500]


@pytest.mark.parametrize(
    ("argv", "world", "needle"),
    [
        (["scheduler=dmd", "num_steps=4"], 1, "num_steps cannot be set with scheduler=dmd"),
        (["scheduler=dmd", "num_steps=3"], 1, "one step per entry of dmd_timesteps"),
        (["scheduler=dmd", "guidance_scale=5"], 1, "guidance_scale cannot be set with scheduler=dmd"),
        (["scheduler=dmd", "guidance_scale=1"], 1, "without CFG"),
        (["scheduler=dmd", "dmd_timesteps=[]"], 1, "dmd_timesteps is empty"),
        (["scheduler=dmd", "dmd_timesteps=[522,757,1000]"], 1, "strictly decreasing"),
        (["scheduler=dmd", "dmd_timesteps=[1000,757,757]"], 1, "strictly decreasing"),
        (["scheduler=dmd", "dmd_timesteps=[1001,500]"], 1, r"outside \[1, 1000\]"),
        (["scheduler=dmd", "dmd_timesteps=[500,0]"], 1, r"outside \[1, 1000\]"),
        (["scheduler=dmd", "parallel.cfg=2"], 2, "parallel.cfg=2 cannot run scheduler=dmd"),
        (["dmd_timesteps=[a]"], 1, "dmd_timesteps"),
        (["model.preset=fastwan2.2-ti2v-5b"], 1, "model.path is missing"),  # runnable with a checkpoint
    ],
)
def test_dmd_bad_input_names_the_key(argv, world, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        cfg, _ = resolve_config(argv, world_size=world)
        cfg.validate(world_size=world)


def test_dmd_with_cfg_parallel_fails_before_anything_loads(tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("loaded weights before the config error")

    monkeypatch.setattr("tessera.models.wan.family.build_wan_on_meta", fail)
    out = tmp_path / "v.mp4"
    assert main(["scheduler=dmd", "parallel.cfg=2", f"output.path={out}"]) == 2
    assert "parallel.cfg=2 cannot run scheduler=dmd" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- checkpoint detection (headers only: a 1.3B/14B-shaped checkpoint costs a few bytes) ----------------------

WAN13 = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
WAN14 = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)


def fake_checkpoint(root: Path, size: dict, pipeline_class: str, gated: bool) -> Path:
    """A diffusers directory whose JSON and safetensors headers look like a real Wan checkpoint; no real weights
    (resolution reads only headers). Its model_index.json names a UniPC scheduler, as FastWan's does."""
    config = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], in_channels=16, out_channels=16,
                  text_dim=4096, freq_dim=256, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024, **size)
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    name = "blocks.0.attn1.to_gate_compress.weight" if gated else "blocks.0.attn1.to_q.weight"
    save_file({name: torch.zeros(1)}, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "UniPCMultistepScheduler", "flow_shift": 8.0}))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": pipeline_class, "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    return root


@pytest.mark.parametrize(("size", "preset", "sparsity"),
                         [(WAN13, "fastwan2.1-t2v-1.3b", 0.8), (WAN14, "fastwan2.1-t2v-14b", 0.9)])
def test_fastwan_checkpoint_defaults(tmp_path, size, preset, sparsity):
    vsa = fake_checkpoint(tmp_path / "vsa", size, "WanDMDPipeline", gated=True)
    cfg, arch = resolve_config([f"model.path={vsa}"])
    cfg.validate(world_size=1)
    assert cfg.model.preset == preset and arch.gate_compress
    assert (cfg.scheduler, list(cfg.dmd_timesteps), cfg.num_steps, cfg.guidance_scale) == ("dmd", list(FASTWAN), 3, 1.0)
    assert (cfg.height, cfg.width, cfg.num_frames) == (448, 832, 61)
    assert (cfg.attention.backend, cfg.attention.sparsity) == ("vsa", sparsity)

    dense = fake_checkpoint(tmp_path / "dense", size, "WanDMDPipeline", gated=False)
    cfg, _ = resolve_config([f"model.path={dense}"])
    assert (cfg.model.preset, cfg.scheduler, cfg.attention.backend) == (preset, "dmd", "dense")

    plain = fake_checkpoint(tmp_path / "plain", size, "WanPipeline", gated=False)
    cfg, _ = resolve_config([f"model.path={plain}"])
    assert cfg.model.preset.startswith("wan2.1") and cfg.scheduler == "unipc" and cfg.num_steps == 50


def test_fastwan_defaults_can_be_overridden(tmp_path):
    root = fake_checkpoint(tmp_path / "ckpt", WAN13, "WanDMDPipeline", gated=True)
    cfg, _ = resolve_config([f"model.path={root}", "height=480", "num_frames=81", "attention.sparsity=0.7",
                             "dmd_timesteps=[1000,500]"])
    cfg.validate(world_size=1)
    assert (cfg.height, cfg.num_frames, cfg.attention.sparsity, cfg.num_steps) == (480, 81, 0.7, 2)
    cfg, _ = resolve_config([f"model.path={root}", "scheduler=unipc", "num_steps=8", "guidance_scale=5"])
    cfg.validate(world_size=1)
    assert (cfg.scheduler, cfg.num_steps, cfg.guidance_scale) == ("unipc", 8, 5.0)
    with pytest.raises(ValueError, match="num_steps cannot be set with scheduler=dmd"):
        resolve_config([f"model.path={root}", "num_steps=4"])


# --- end to end on a tiny WanDMDPipeline checkpoint -------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """Tiny random diffusers checkpoint (no VSA gate) relabelled as a FastWan (WanDMDPipeline) checkpoint."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from _wan_checkpoint import write_diffusers_checkpoint

    root = write_diffusers_checkpoint(tmp_path_factory.mktemp("fastwan") / "FastWan-tiny-Diffusers", seed=1)
    index = json.loads((root / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]  # the DMD detection must win over it
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanDMDPipeline"}))
    return root


@pytest.fixture(scope="module")
def gated_ckpt(ckpt, tmp_path_factory) -> Path:
    """The same checkpoint with random VSA gate weights (`attn1.to_gate_compress`) added: trained-with-VSA."""
    root = tmp_path_factory.mktemp("fastwan_vsa") / "FastWan-tiny-VSA"
    shutil.copytree(ckpt, root)
    file = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    dim = state["blocks.0.attn1.to_q.weight"].shape[0]
    gen = torch.Generator().manual_seed(2)
    for block in sorted({key.split(".")[1] for key in state if key.startswith("blocks.")}):
        state[f"blocks.{block}.attn1.to_gate_compress.weight"] = 0.2 * torch.randn(dim, dim, generator=gen)
        state[f"blocks.{block}.attn1.to_gate_compress.bias"] = 0.2 * torch.randn(dim, generator=gen)
    save_file(state, str(file))
    return root


def dmd_reference(ckpt: Path, prompt: str, num_frames: int, height: int, width: int, seed: int,
                  latent_channels: int = 16, spatial_stride: int = 8) -> torch.Tensor:
    """The DMD semantics, written from the issue text: diffusers' DiT, the checkpoint's UMT5, fp32 on the CPU. The
    latent grid of the checkpoint's VAE: Wan2.1's by default (16 channels, 8x spatial; TI2V-5B's: 48, 16x)."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    text = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(ckpt / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(ckpt / "text_encoder").eval(),
                       vae=None, transformer=None, scheduler=None)
    embeds, _ = text.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
    dit = WanTransformer3DModel.from_pretrained(ckpt / "transformer").eval()

    raw = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    table = raw * 8 / (raw * 7 + 1)
    grid_t = table * 1000

    def sigma_of(t: int) -> torch.Tensor:
        return table[torch.argmin((grid_t.double() - t).abs())]

    gen = torch.Generator("cpu").manual_seed(seed)
    f, h, w = (num_frames - 1) // 4 + 1, height // spatial_stride, width // spatial_stride

    def draw() -> torch.Tensor:
        return torch.randn((1, f, latent_channels, h, w), generator=gen, dtype=torch.float32).permute(0, 2, 1, 3, 4)

    x = draw()
    with torch.no_grad():
        for i, t in enumerate(FASTWAN):
            v = dit(x, torch.tensor([t]), embeds, return_dict=False)[0]
            x0 = (x.double() - sigma_of(t).double() * v.double()).float()
            if i == len(FASTWAN) - 1:
                return x0
            s = sigma_of(FASTWAN[i + 1])
            x = (1 - s) * x0 + s * draw()
    raise AssertionError("unreachable")


def run_args(path: Path, out: Path, run: dict, *extra: str) -> list[str]:
    return [f"model.path={path}", f"prompt={PROMPT}", f"output.path={out}", "output.save_latents=true",
            *(f"{k}={v}" for k, v in run.items()), *extra]


def run_torchrun(tmp_path: Path, argv: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "generate.py"), *argv, "parallel.sp=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def dense_reference(ckpt) -> torch.Tensor:
    return dmd_reference(ckpt, PROMPT, **DENSE_RUN)


def test_one_rank_matches_reference(ckpt, dense_reference, tmp_path):
    out = tmp_path / "one.mp4"
    assert main(run_args(ckpt, out, DENSE_RUN)) == 0  # no sampler, steps or backend given: the checkpoint's
    assert rel_err(latents_of(out), dense_reference) < 1e-5
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["config"]["scheduler"] == "dmd" and report["config"]["num_steps"] == 3
    assert report["config"]["guidance_scale"] == 1.0 and report["attention"]["backend"] == "dense"  # no gate
    sampler = report["sampler"]
    assert sampler["name"] == "dmd" and sampler["timesteps"] == list(FASTWAN) and not sampler["uses_cfg"]
    assert [f32_bits(s) for s in sampler["sigmas"]] == [0x3F800000, 0x3F41BACF, 0x3F0590B2]


@pytest.mark.multirank
def test_two_ranks_match_reference(ckpt, dense_reference, tmp_path):
    out = tmp_path / "sp2.mp4"
    run_torchrun(tmp_path, run_args(ckpt, out, DENSE_RUN))
    assert rel_err(latents_of(out), dense_reference) < 1e-5


@pytest.mark.multirank
def test_vsa_two_ranks_match_one_rank(gated_ckpt, tmp_path):
    """A gated checkpoint defaults to VSA; at sparsity 0.5 (4 of 8 key tiles) 2 ranks equal 1 rank, and the sparse
    run differs from the dense one (VSA really ran, the coarse branch included)."""
    one, two, dense = tmp_path / "vsa1.mp4", tmp_path / "vsa2.mp4", tmp_path / "dense.mp4"
    assert main(run_args(gated_ckpt, one, VSA_RUN, "attention.sparsity=0.5")) == 0
    report = json.loads(one.with_suffix(".json").read_text())
    assert report["attention"]["backend"] == "vsa" and report["config"]["scheduler"] == "dmd"
    run_torchrun(tmp_path, run_args(gated_ckpt, two, VSA_RUN, "attention.sparsity=0.5"))
    assert rel_err(latents_of(two), latents_of(one)) < 1e-5
    assert main(run_args(gated_ckpt, dense, VSA_RUN, "attention.backend=dense")) == 0
    assert rel_err(latents_of(one), latents_of(dense)) > 1e-3
