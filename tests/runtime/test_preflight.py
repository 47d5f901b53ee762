"""Checks before any process group or weight load: the output location really takes files, the request fits in
memory. Both fail in seconds with exit 2 and one `error:` line naming the key, and leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
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


def test_a_sparse_backends_cpu_reference_is_estimated_by_that_backend():
    """On a CPU a sparse backend runs its PyTorch reference: VSA's holds [B, N, S, S] scores, SLA's one query block's
    scores at a time, so at 480x832x81 (32,760 tokens) VSA's estimate is about 1.3 TiB more and SLA's a few GiB."""
    if torch.cuda.is_available():
        pytest.skip("the reference's term applies without a GPU")
    size = ["model.preset=wan2.1-t2v-1.3b", "num_frames=81", "height=480", "width=832", "guidance_scale=1"]
    activations = {}
    for backend in ("dense", "vsa", "sla"):
        cfg, model_cfg = resolve_config([*size, f"attention.backend={backend}"])
        activations[backend] = estimate_request_memory(cfg, model_cfg, sp=2, rank=0).activations
    heads, tokens = 12 // 2, 21 * 30 * 52
    assert activations["vsa"] - activations["dense"] == heads * tokens * tokens * 13
    assert 0 < activations["sla"] - activations["dense"] < 8 * 1024**3


def _allocated_peak(run) -> int:
    """Peak bytes the CPU allocator holds during `run()` beyond what it held before: the profiler's memory events
    (exact accounting of every tensor allocation and free, unlike a process's resident set)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = [event["args"] for event in events if event.get("name") == "[memory]"]
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(args["Total Allocated"] for args in memory) - before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend,low,high", [("vsa", 0.98, 1.05), ("sla", 0.85, 1.1)])
def test_reference_bytes_match_the_allocated_peak(backend, low, high, dtype):
    """A sparse backend's `reference_bytes` (the pre-flight's term) against what its reference really allocates."""
    from tessera.attention import build_sla_metadata, build_vsa_metadata, get_backend
    from tessera.attention.sla import sla_attention_reference
    from tessera.attention.vsa import vsa_attention_reference

    heads, dim = 3, 48
    grid = (7, 20, 36) if backend == "sla" else (5, 18, 30)  # partial last blocks (5,040 tokens) and tiles
    tokens = grid[0] * grid[1] * grid[2]
    q, k, v = torch.randn(3, 1, heads, tokens, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    options = dict(sla_topk=0.25, sla_block_q=64, sla_block_k=32) if backend == "sla" else {}
    if backend == "sla":
        metadata, weight = build_sla_metadata(grid, "cpu", **options), torch.randn(dim, dim)
        peak = _allocated_peak(lambda: sla_attention_reference(q, k, v, metadata, proj_l_weight=weight))
    else:
        metadata = build_vsa_metadata(grid, 0.5, "cpu")
        peak = _allocated_peak(lambda: vsa_attention_reference(q, k, v, q, metadata))
    ratio = peak / get_backend(backend).reference_bytes(1, heads, tokens, dim, **options)
    assert low < ratio < high
