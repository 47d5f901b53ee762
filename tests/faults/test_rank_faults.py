"""Fault injection on real 2-rank torchrun jobs (gloo, CPU): each fault must end the whole job quickly with
a message naming the rank and the phase, a non-zero exit code, no output or temp file, no process left.

Faults come from the test-only TESSERA_FAULT hook (runtime/faults.py, README "Testing").
"""

from __future__ import annotations

import re
import signal

import pytest
from _jobs import leftovers, processes_mentioning, run_job, start_job

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

TIME_BOUND_S = 60.0  # startup (~3 s) + 3 tiny steps + torchrun teardown, with a wide margin for slow CI


def _assert_clean(tmp_path) -> None:
    assert leftovers(tmp_path) == [], f"output or temp files left behind: {leftovers(tmp_path)}"
    assert processes_mentioning(str(tmp_path)) == [], "processes left behind"


def test_rank_raising_at_a_step_stops_the_job(tmp_path):
    code, err, seconds = run_job(tmp_path, fault="raise@step=1,rank=1")
    assert code != 0
    assert "error: rank 1 failed during step 1: InjectedFault" in err, err[-3000:]
    # The survivor says why it stopped: its collective broke, or torchrun's SIGTERM came first.
    assert re.search(r"error: rank 0 (stopped|interrupted by SIGTERM) during step [01]", err), err[-3000:]
    assert seconds < TIME_BOUND_S
    _assert_clean(tmp_path)


def test_rank_killed_with_sigkill_stops_the_job(tmp_path):
    code, err, seconds = run_job(tmp_path, fault="kill@step=1,rank=1")
    assert code != 0
    assert re.search(r"rank\s+: 1 .*\n\s+exitcode\s+: -9", err), err[-3000:]  # torchrun's summary names it
    assert re.search(r"error: rank 0 (stopped|interrupted by SIGTERM) during step [01]", err), err[-3000:]
    assert seconds < TIME_BOUND_S
    _assert_clean(tmp_path)


def test_hung_rank_is_bounded_by_the_collective_timeout(tmp_path):
    job = start_job(tmp_path, "parallel.timeout_s=5", fault="sleep@step=1,rank=1")
    job.wait_for("sleeping")
    code, err, seconds = job.wait()
    assert code != 0
    assert "error: rank 0 stopped during step 1" in err and "parallel.timeout_s=5 s" in err, err[-3000:]
    assert seconds < 5 + TIME_BOUND_S / 2
    _assert_clean(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_launcher_stops_every_rank(tmp_path, sig):
    job = start_job(tmp_path, "parallel.timeout_s=60", fault="sleep@step=1,rank=1")
    job.wait_for("sleeping")  # rank 1 sleeps inside step 1; rank 0 waits for it in a collective
    sent = job.signal_launcher(sig)
    code, err, seconds = job.wait(since=sent)
    assert code != 0
    name = signal.Signals(sig).name
    for rank in (0, 1):
        assert f"error: rank {rank} interrupted by {name} during step 1" in err, err[-3000:]
    assert re.search(rf"exitcode\s+: {128 + sig} ", err) or "SignalException" in err, err[-3000:]
    assert seconds < TIME_BOUND_S / 2
    _assert_clean(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_a_single_process_run_exits_128_plus_signal(tmp_path, sig):
    job = start_job(tmp_path, fault="sleep@step=1", nproc=0)
    job.wait_for("sleeping")
    code, err, seconds = job.wait(since=job.signal_launcher(sig))
    assert code == 128 + sig, err[-3000:]
    assert f"error: rank 0 interrupted by {signal.Signals(sig).name} during step 1" in err
    assert seconds < TIME_BOUND_S / 2
    _assert_clean(tmp_path)


def test_rank_with_a_different_config_is_refused_before_denoising(tmp_path):
    code, err, seconds = run_job(tmp_path, fault="override@rank=1,seed=9")
    assert code != 0
    assert "error: rank 0 failed during config: ranks resolved different configs: rank 1: seed=9 (rank 0: 0)" in err
    assert "denoising" not in err and seconds < TIME_BOUND_S
    _assert_clean(tmp_path)


def test_nan_in_latents_fails_with_the_step_and_writes_nothing(tmp_path):
    code, err, seconds = run_job(tmp_path, fault="nan@step=1,rank=1")
    assert code != 0
    assert "failed during step 1: latents are NaN/Inf after denoising step 1 (first seen on rank(s) [1])" in err
    assert seconds < TIME_BOUND_S
    _assert_clean(tmp_path)


def test_unwritable_output_directory_fails_before_any_work(tmp_path):
    (tmp_path / "out").write_text("a regular file where the output directory should be")
    code, err, seconds = run_job(tmp_path, "output.path=" + str(tmp_path / "out" / "sub" / "video.mp4"))
    assert code != 0
    # checked on every rank before the process group exists; printed once, by rank 0
    assert "error: output.path=" in err and "is not a directory" in err, err[-3000:]
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert "denoising" not in err and seconds < TIME_BOUND_S
    assert (tmp_path / "out").read_text().startswith("a regular file")
    assert processes_mentioning(str(tmp_path)) == []


@pytest.mark.parametrize(("fault", "needle"), [
    ("enospc@phase=write", "error: rank 0 failed during write: OSError: [Errno 28] No space left on device"),
    ("raise@phase=write", "error: rank 0 failed during write: InjectedFault"),
])
def test_failure_while_writing_removes_every_output_file(tmp_path, fault, needle):
    # The fault fires after the video (and latents) are in place, before the report: all must go.
    code, err, seconds = run_job(tmp_path, "output.save_latents=true", fault=fault)
    assert code != 0
    assert needle in err, err[-3000:]
    assert seconds < TIME_BOUND_S
    _assert_clean(tmp_path)
