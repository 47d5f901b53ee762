"""Two torchrun agents ("nodes") on localhost join one 4-rank job through the c10d rendezvous, as a two-machine
launch does (README "Several machines"); each agent has LOCAL_RANK 0 and 1 while RANK runs 0..3. The job's final
latents equal one rank's (fp32, rel 1e-5) and exactly one video is written (by global rank 0)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SMALL = ["num_frames=13", "height=112", "width=80", "num_steps=2", "seed=5", "output.save_latents=true",
         "attention.backend=vsa", "attention.sparsity=0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_form_one_job_equal_to_one_rank(tmp_path):
    generate = str(REPO / "launch" / "generate.py")
    one = tmp_path / "one.mp4"
    subprocess.run([sys.executable, generate, *SMALL, f"output.path={one}"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)

    out, port = tmp_path / "two-nodes.mp4", _free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
             "--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             "--rdzv-id=tessera-test", generate, *SMALL, "parallel.cfg=2", "parallel.sp=2", f"output.path={out}"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    results = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, results, strict=True):
        assert agent.returncode == 0, err[-3000:]

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["world_size"] == 4 and report["sp"] == 2 and report["cfg"] == 2
    a = load_file(str(out.with_suffix(".latents.safetensors")))["latents"]
    b = load_file(str(one.with_suffix(".latents.safetensors")))["latents"]
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == ["one.mp4", "two-nodes.mp4"]
    assert torch.isfinite(a).all()
