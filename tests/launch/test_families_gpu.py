"""GPU tier of the model families: Wan2.1 I2V, Wan2.2 TI2V-5B and Wan2.2 A14B through the CLI on one CUDA GPU.

Real `python launch/generate.py` (and one `torchrun`) jobs, as tests/launch/test_cli_gpu.py runs them, on the tiny
checkpoints of the CPU family tests (tests/runtime/_wan_checkpoint.py), against the same command on the CPU
(`CUDA_VISIBLE_DEVICES=`). Every run is VSA at sparsity 0.5 with `model.cuda_graphs` left at auto, 17 frames (5
latent frames) at 4 steps, CFG 5, on token grids with partial VSA tiles; I2V and TI2V from a 75x53 PNG
(`image=`: CLIP + first-frame VAE encode for I2V, per-token timesteps for TI2V). Head dims: the I2V writer takes
DiT overrides, so its DiT is 2 heads x 128 (the Triton fine kernel in fp32, the Gluon one in bf16 on Hopper); the
TI2V and two-expert writers take none, so theirs are 2 heads x 16, which the Triton VSA kernel also serves (head
dims 16 to 256, attention/vsa.py). No family falls back to dense attention.

Bounds: fp32 GPU vs fp32 CPU final latents: FP32_VS_CPU (as test_cli_gpu.py). bf16 on the GPU: completes with
finite latents and a 17-frame mp4 (its error against the CPU is printed). A14B with `model.offload_experts=true`
against its resident run: OFFLOAD_VS_RESIDENT (the same kernels on the same weights: bit-identical unless a
process's autotuner picks another config; printed), and the report's `experts` says the experts were offloaded and
moved once each. TI2V from the image at sp=2 on the one GPU (gloo, `TESSERA_TEST_ONE_GPU=1`) against one rank:
FP32_VS_ONE_RANK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from _runs import latents_of, rel_err  # noqa: E402
from _wan_checkpoint import write_i2v_checkpoint, write_ti2v_checkpoint, write_two_expert_checkpoint  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
NUM_FRAMES = 17
COMMON = [f"num_frames={NUM_FRAMES}", "num_steps=4", "seed=3", "prompt=a red fox in snow", "attention.backend=vsa",
          "attention.sparsity=0.5"]
BOUNDARY = 0.875  # with 4 steps at flow shift 2 both experts run
FAMILIES = {  # family -> (checkpoint writer, height, width, overrides); tokens (5, 7, 11) and (5, 5, 7)
    "i2v": (lambda root: write_i2v_checkpoint(root, num_attention_heads=2, attention_head_dim=128, ffn_dim=256,
                                              added_kv_proj_dim=256), 112, 176, []),
    "ti2v": (write_ti2v_checkpoint, 160, 224, []),
    "a14b": (lambda root: write_two_expert_checkpoint(root, BOUNDARY), 112, 176, ["guidance_scale_2=2.0"]),
}
IMAGE_FAMILIES = ("i2v", "ti2v")
FP32_VS_CPU = 1e-4
FP32_VS_ONE_RANK = 1e-5
OFFLOAD_VS_RESIDENT = 1e-6


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A 75x53 RGB PNG (odd sizes, another aspect than the video's): ramps plus noise."""
    from PIL import Image

    y, x = np.mgrid[0:53, 0:75]
    noise = np.random.default_rng(0).integers(0, 64, (53, 75, 3))
    path = tmp_path_factory.mktemp("img") / "first_frame.png"
    Image.fromarray((np.stack([x * 3, y * 4, (x + y) * 2], axis=-1) + noise).clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image):
    """`runs(family, name, nproc, *overrides, cpu=False, one_gpu=False)` -> (latents, report, video path); each
    family's checkpoint is written once and each distinct job runs once per module."""
    root, ckpts, cache = tmp_path_factory.mktemp("runs"), {}, {}

    def run(family: str, name: str, nproc: int, *overrides: str, cpu: bool = False, one_gpu: bool = False):
        key = f"{family}-{name}"
        if key not in cache:
            writer, height, width, extra = FAMILIES[family]
            if family not in ckpts:
                ckpts[family] = writer(root / f"ckpt-{family}")
            out = root / f"{key}.mp4"
            env = dict(os.environ)
            if cpu:
                env["CUDA_VISIBLE_DEVICES"] = ""
            if one_gpu:
                env["TESSERA_TEST_ONE_GPU"] = "1"
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
            image_arg = [f"image={image}"] if family in IMAGE_FAMILIES else []
            cmd = [sys.executable, *launcher, str(REPO / "launch" / "generate.py"), *COMMON, f"height={height}",
                   f"width={width}", *extra, *image_arg, f"model.path={ckpts[family]}", f"output.path={out}",
                   "output.save_latents=true", *overrides]
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{key}: {proc.stderr[-4000:]}"
            cache[key] = (latents_of(out), json.loads(out.with_suffix(".json").read_text()), out)
        return cache[key]

    return run


def _check_video_and_report(family: str, report: dict, out: Path, world: int = 1) -> None:
    _, height, width, _ = FAMILIES[family]
    frames = iio.imread(out)
    assert frames.shape == (NUM_FRAMES, height, width, 3) and frames.dtype.name == "uint8"
    assert report["device"].startswith("cuda") and report["world_size"] == world
    assert report["attention"]["backend"] == "vsa"
    assert report["attention"]["kernels"]["vsa"] in ("triton", "gluon")  # the kernel, not the CPU reference
    if family in IMAGE_FAMILIES:
        assert report["image"]["size"] == [75, 53]
    if family == "a14b":
        assert sorted(set(report["experts"]["expert_per_step"])) == ["transformer", "transformer_2"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_on_one_gpu_matches_the_cpu(runs, family):
    cpu, _, _ = runs(family, "cpu", 0, cpu=True)
    gpu, report, out = runs(family, "gpu", 0)
    _check_video_and_report(family, report, out)
    graphs = report["cuda_graphs"]
    assert graphs["adaptive"]  # model.cuda_graphs=auto on one CUDA rank
    err = rel_err(gpu, cpu)
    print(f"{family} fp32 vsa one GPU vs CPU: rel {err:.3e} (VSA kernel {report['attention']['kernels']['vsa']}, "
          f"{graphs['graphs']} CUDA graphs, disabled because {graphs['disabled_because']})")
    assert err < FP32_VS_CPU


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_on_one_gpu_completes(runs, family):
    cpu, _, _ = runs(family, "cpu", 0, cpu=True)
    gpu, report, out = runs(family, "gpu-bf16", 0, "model.dtype=bfloat16")
    _check_video_and_report(family, report, out)
    assert torch.isfinite(gpu).all()
    print(f"{family} bf16 vsa one GPU vs fp32 CPU: rel {rel_err(gpu, cpu):.3e} "
          f"(VSA kernel {report['attention']['kernels']['vsa']})")


def test_a14b_offloaded_experts_equal_resident_ones(runs):
    resident, resident_report, _ = runs("a14b", "gpu", 0)
    offloaded, report, out = runs("a14b", "gpu-offload", 0, "model.offload_experts=true")
    _check_video_and_report("a14b", report, out)
    assert resident_report["experts"]["offloaded"] is False
    experts = report["experts"]
    assert experts["offloaded"] is True and experts["bytes_per_move"] > 0
    assert [m["expert"] for m in experts["moves"]] == ["transformer", "transformer_2"]
    err = rel_err(offloaded, resident)
    print(f"a14b fp32 offloaded vs resident experts: rel {err:.3e} (bit-identical: "
          f"{torch.equal(offloaded, resident)}), moves {experts['move_seconds']:.3f} s")
    assert err < OFFLOAD_VS_RESIDENT


def test_ti2v_two_ranks_on_one_gpu_equal_one_rank(runs):
    one, _, _ = runs("ti2v", "gpu", 0)
    two, report, out = runs("ti2v", "one-gpu-sp2", 2, "parallel.sp=2", one_gpu=True)
    _check_video_and_report("ti2v", report, out, world=2)
    assert report["sp"] == 2 and all(r["device"].startswith("cuda") for r in report["ranks"])
    err = rel_err(two, one)
    print(f"ti2v fp32 vsa sp=2 on one GPU vs one rank: rel {err:.3e}")
    assert err < FP32_VS_ONE_RANK
