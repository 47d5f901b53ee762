"""Checks before any process group or weight load: the output location really takes files, the request fits in
memory. Both fail in seconds with exit 2 and one `error:` line naming the key, and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tessera.launch.config import load_preset, resolve_config
from tessera.launch.generate import main
from tessera.models.wan import WanConfig, build_wan_on_meta
from tessera.runtime.preflight import estimate_request_memory

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["wan-tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
@pytest.mark.parametrize("gate", [False, True])
def test_parameter_count_matches_the_model(preset, gate):
    arch, _ = load_preset(preset)
    model_cfg = WanConfig(**{**arch, "gate_compress": gate})
    model = build_wan_on_meta(model_cfg)  # meta device: no memory
    assert model_cfg.parameter_count() == sum(p.numel() for p in model.parameters())


def test_activations_per_rank_fall_with_sp_and_weights_do_not():
    cfg, arch = resolve_config(["model.preset=wan2.1-t2v-1.3b", "attention.backend=dense"])
    model_cfg = arch
    one = estimate_request_memory(cfg, model_cfg, sp=1, rank=0)
    four = estimate_request_memory(cfg, model_cfg, sp=4, rank=1)
    assert one.weights == four.weights == model_cfg.parameter_count() * 4  # fp32
    assert 3.0 < one.activations / four.activations <= 4.0
    assert four.decode == 0 and one.decode > 0  # only rank 0 decodes
    bf16 = estimate_request_memory(replace(cfg, model=replace(cfg.model, dtype="bfloat16")), model_cfg, sp=1, rank=0)
    assert bf16.weights * 2 == one.weights


def test_impossible_request_fails_fast_naming_the_size(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    start = time.monotonic()
    code = main(["num_frames=100001", "height=16384", "width=16384", f"output.path={out}"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 30
    assert err.count("error:") == 1
    for needle in ("num_frames=100001", "height=16384", "width=16384", "GiB", "model.memory_check=false"):
        assert needle in err
    assert list(tmp_path.iterdir()) == []


def test_memory_check_can_be_skipped(tmp_path):
    """With the check off, the same config gets past pre-flight (it then fails elsewhere: the RoPE table limit)."""
    cfg, arch = resolve_config(["num_frames=100001", "height=16384", "width=16384", "model.memory_check=false",
                                f"output.path={tmp_path / 'v.mp4'}"])
    from tessera.runtime.preflight import preflight_request

    assert preflight_request(cfg, arch, rank=0, device=torch.device("cpu")) is None


@pytest.mark.parametrize("target", ["/proc/x/v.mp4", "/sys/v.mp4", "/proc/v.mp4"])
def test_unwritable_output_location_fails_before_any_work(target, capsys):
    if not Path(target).parts[1:2] or not Path("/" + Path(target).parts[1]).exists():
        pytest.skip(f"no {target} on this system")
    start = time.monotonic()
    assert main([f"output.path={target}", "num_steps=1"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert err.count("error:") == 1 and "output.path" in err and "cannot create files" in err


def test_probe_leaves_nothing_behind(tmp_path):
    cfg, arch = resolve_config([f"output.path={tmp_path / 'sub' / 'v.mp4'}", "output.save_latents=true"])
    from tessera.runtime.preflight import preflight_request

    preflight_request(cfg, arch, rank=0, device=torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []  # no probe file, no created directory


@pytest.mark.multirank
def test_existing_output_under_torchrun_prints_one_error(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"not a video")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "generate.py"), "parallel.sp=2", "num_steps=1", f"output.path={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "already exists" in errors[0] and "output.overwrite=true" in errors[0]
    assert "interrupted by" not in proc.stderr and "during load" not in proc.stderr
    assert out.read_bytes() == b"not a video"
