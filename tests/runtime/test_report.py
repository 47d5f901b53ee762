"""The JSON report says what produced it and what every rank measured; one log line per phase; bars shown once.

Provenance and the git probe are unit-tested; one in-process run checks the phase log lines, `stage_seconds`
and the denoising bar; one real 2-rank torchrun job on a tiny diffusers checkpoint checks `ranks` and that
transformers' loading bar appears once, not once per rank.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from tessera.launch.generate import main
from tessera.runtime.report import _git_state, collect_provenance

REPO = Path(__file__).resolve().parents[2]
TINY = ["num_frames=9", "height=32", "width=48", "num_steps=2", "seed=1", "prompt=a red fox"]
PROVENANCE_KEYS = {"tessera", "git_commit", "dirty", "torch", "triton", "cuda", "device_name", "hostname",
                   "timestamp"}
STAGE_KEYS = {"load", "text_encode", "first_step", "denoise", "decode", "write", "total"}
# In the order they are logged (rank 0, logger "tessera").
PHASE_LINES = [
    r"text encoded in \d+\.\d\d s",
    r"weights loaded: \d+\.\d\d GiB in \d+\.\d\d s",
    r"first step \(compile\) \d+\.\d\d s",
    r"decode \d+\.\d\d s",
    r"wrote .+ \(9 frames, \d+\.\d s total\)",
]
HAS_GIT = shutil.which("git") is not None


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def _assert_provenance(prov: dict) -> None:
    assert set(prov) == PROVENANCE_KEYS
    assert prov["tessera"] == importlib.metadata.version("tessera")
    assert prov["torch"] == torch.__version__ and prov["cuda"] == torch.version.cuda
    assert prov["device_name"] and prov["hostname"]
    stamp = datetime.fromisoformat(prov["timestamp"])
    assert stamp.utcoffset() == timedelta(0)  # timezone-aware, UTC
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(minutes=10)
    if HAS_GIT and (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])
        assert isinstance(prov["dirty"], bool)


def _visible_lines(stream: str) -> list[str]:
    """What a terminal shows: each line's text after its last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in stream.split("\n")]


def test_provenance_names_versions_commit_device_host_and_time():
    prov = collect_provenance(torch.device("cpu"))
    _assert_provenance(prov)
    if HAS_GIT and (REPO / ".git").exists():
        assert prov["git_commit"] == _git(REPO, "rev-parse", "HEAD")


@pytest.mark.skipif(not HAS_GIT, reason="needs git")
def test_git_state_only_for_a_checkout_of_its_own(tmp_path):
    assert _git_state(tmp_path) == (None, None)  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "tracked.txt").write_text("one\n")
    _git(tmp_path, "add", "tracked.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert _git_state(tmp_path) == (head, False)
    (tmp_path / "untracked.txt").write_text("new\n")
    assert _git_state(tmp_path) == (head, False)  # untracked files do not make a checkout dirty
    (tmp_path / "tracked.txt").write_text("two\n")
    assert _git_state(tmp_path) == (head, True)
    installed = tmp_path / "site-packages"  # a wheel installed inside some other repository
    installed.mkdir()
    assert _git_state(installed) == (None, None)


def test_one_run_logs_each_phase_once_and_reports_stages(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="tessera")
    out = tmp_path / "one.mp4"
    assert main([*TINY, f"output.path={out}"]) == 0

    messages = [r.getMessage() for r in caplog.records if r.name == "tessera" and r.levelno == logging.INFO]
    for pattern in PHASE_LINES:
        assert sum(bool(re.fullmatch(pattern, m)) for m in messages) == 1, (pattern, messages)
    order = [next(i for i, m in enumerate(messages) if re.fullmatch(p, m)) for p in PHASE_LINES]
    assert order == sorted(order), messages

    report = json.loads(out.with_suffix(".json").read_text())
    _assert_provenance(report["provenance"])
    stages = report["stage_seconds"]
    assert set(stages) == STAGE_KEYS and all(stages[k] > 0 for k in STAGE_KEYS), stages
    assert stages["first_step"] == report["step_seconds"][0]
    assert stages["denoise"] >= sum(report["step_seconds"])
    assert stages["total"] == report["total_seconds"]
    assert stages["total"] > sum(stages[k] for k in ("load", "text_encode", "denoise", "decode", "write"))
    assert report["weights"]["parameter_bytes"] > 0
    (rank0,) = report["ranks"]
    assert rank0["rank"] == 0 and rank0["device"] == "cpu" and rank0["peak_memory_bytes"] > 0
    assert rank0["step_seconds"] == report["step_seconds"]

    # The finished bar stays on screen (leave=True) with its rate.
    bars = [line for line in _visible_lines(capsys.readouterr().err) if line.startswith("denoising:")]
    assert len(bars) == 1 and "100%" in bars[0] and "2/2" in bars[0], bars
    assert re.search(r"(it/s|s/it)\]$", bars[0]), bars


def test_progress_bars_hidden_for_the_load_then_restored():
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    from tessera.models.wan.conditioning import hf_progress_bars

    for hf_logging in (transformers_logging, diffusers_logging):
        assert hf_logging.is_progress_bar_enabled()
        with hf_progress_bars(hf_logging, show=True):
            assert hf_logging.is_progress_bar_enabled()
        with hf_progress_bars(hf_logging, show=False):
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # switched off by the user: a load must not switch it back on
        try:
            with hf_progress_bars(hf_logging, show=False):
                pass
            assert not hf_logging.is_progress_bar_enabled()
        finally:
            hf_logging.enable_progress_bar()


@pytest.mark.multirank
@pytest.mark.slow
def test_two_rank_job_reports_every_rank_and_shows_loading_bars_once(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from _wan_checkpoint import write_diffusers_checkpoint
    from test_generate_e2e import run_generate

    ckpt = write_diffusers_checkpoint(tmp_path / "Wan2.1-tiny-Diffusers")
    out, proc = run_generate(tmp_path, "sp2", 2, "parallel.sp=2", f"model.path={ckpt}")
    report = json.loads(out.with_suffix(".json").read_text())
    num_steps = report["config"]["num_steps"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    for rank in report["ranks"]:
        assert len(rank["step_seconds"]) == num_steps and all(s > 0 for s in rank["step_seconds"])
        assert rank["peak_memory_bytes"] > 0 and rank["device"] == "cpu"
    assert report["ranks"][0]["step_seconds"] == report["step_seconds"]
    _assert_provenance(report["provenance"])

    # transformers draws the UMT5 load's bar on rank 0 only (each bar starts at 0%); log lines come once.
    assert len(re.findall(r"Loading weights:\s+0%", proc.stderr)) == 1, proc.stderr[-3000:]
    assert proc.stderr.count("text encoded in") == 1 and proc.stderr.count("decode ") == 1
    assert "[rank1] INFO" not in proc.stderr
