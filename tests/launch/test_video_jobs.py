"""The server's writer thread, in one process: rank 0's request loop (`launch/serve.py`) over a real `VideoJobs`, with
a stand-in pipeline whose videos record when they are generated and written.

No sleeps: the first job's write waits (on an event) until the second job's generation has started, so a server
that wrote before taking the next job would time out and fail the first job; the order is then read from the job
objects' own timestamps.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

from tessera.launch.serve import _request_loop
from tessera.launch.video_jobs import VideoJobs

WAIT_S = 30.0  # only reached when the behaviour under test is broken


class _Video:
    """A generated video: `save` writes a stand-in mp4 and report, as `Video.save` does; `write` decides how."""

    def __init__(self, seed: int, write) -> None:
        self.seed, self._write = seed, write
        self.report = {"stage_seconds": {"denoise": 0.5, "write": None}, "step_seconds": [0.25, 0.25],
                       "denoise_seconds": 0.5, "total_seconds": 1.0}

    def save(self, path: Path, *, save_latents: bool = False) -> Path:
        self._write(self.seed, path)
        self.report["stage_seconds"]["write"] = 0.125
        path.write_bytes(b"mp4")
        path.with_suffix(".json").write_text(json.dumps(self.report))
        return path


class _Pipe:
    """Stands in for `VideoPipeline` on rank 0: `on_generate(seed)` runs at the start of each generation."""

    phase = "step 1"

    def __init__(self, on_generate, write) -> None:
        self.on_generate, self.write = on_generate, write

    def generate(self, *, on_step, seed: int) -> _Video:
        self.on_generate(seed)
        on_step(0, 2)
        on_step(1, 2)
        return _Video(seed, self.write)


def _jobs(tmp_path: Path, seeds: tuple[int, ...]) -> tuple[VideoJobs, list[str]]:
    jobs = VideoJobs(tmp_path, max_queue=8, drain_timeout_s=60.0, model="stand-in")
    jobs.ready(lambda body, path: ({"seed": body["seed"]}, {}, False))
    return jobs, [jobs.submit(json.dumps({"seed": seed}).encode())["id"] for seed in seeds]


def test_next_job_generates_while_the_previous_one_is_written(tmp_path):
    jobs, (first, second) = _jobs(tmp_path, (1, 2))
    second_started = threading.Event()
    seen = {}

    def on_generate(seed: int) -> None:
        if seed == 2:
            seen["first, while the second generates"] = jobs.get(first).to_json()
            second_started.set()
            jobs.request_stop(signal.SIGTERM)  # the loop stops once this job is generated

    def write(seed: int, path: Path) -> None:
        if seed == 1 and not second_started.wait(WAIT_S):
            raise TimeoutError("the first job's write held the mesh: the second job never started")

    _request_loop(_Pipe(on_generate, write), jobs, control=None, rank=0)
    jobs.wait_for_writes()
    one, two = jobs.get(first), jobs.get(second)
    assert (one.status, two.status) == ("completed", "completed"), (one.error, two.error)
    # the mesh took the second job after handing the first to the writer, and before its files were written
    assert one.started_at < one.generated_at <= two.started_at < one.written_at <= two.written_at
    assert seen["first, while the second generates"]["status"] == "in_progress"  # not completed before written
    assert seen["first, while the second generates"]["progress"] == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.{ext}" for i in (first, second)
                                                               for ext in ("mp4", "json"))
    metrics = jobs.metrics()
    assert 'tessera_stage_seconds_sum{stage="write"} 0.250000' in metrics  # the write time is still counted
    assert 'tessera_requests_total{status="completed"} 2' in metrics and "tessera_jobs_writing 0" in metrics


def test_a_failing_write_fails_its_job_alone_and_the_writer_carries_on(tmp_path):
    jobs, (doomed, fine) = _jobs(tmp_path, (1, 2))

    def on_generate(seed: int) -> None:
        if seed == 2:
            jobs.request_stop(signal.SIGTERM)

    def write(seed: int, path: Path) -> None:
        if seed == 1:  # what the real writer meets when the folder is gone: its parent is now a file
            (tmp_path / "gone").write_bytes(b"")
            (tmp_path / "gone" / "x.mp4").write_bytes(b"")

    _request_loop(_Pipe(on_generate, write), jobs, control=None, rank=0)
    jobs.wait_for_writes()
    failed, completed = jobs.get(doomed), jobs.get(fine)
    assert failed.status == "failed" and failed.error["code"] == "write_failed"
    assert failed.error["message"].startswith("rank 0 failed during write: NotADirectoryError")
    assert completed.status == "completed" and completed.written_at > failed.written_at
    assert 'tessera_requests_total{status="failed"} 1' in jobs.metrics()


def test_shutdown_waits_for_pending_writes(tmp_path):
    jobs, ids = _jobs(tmp_path, (1, 2, 3))
    release = threading.Event()

    def on_generate(seed: int) -> None:
        if seed == 3:
            jobs.request_stop(signal.SIGTERM)
            release.set()  # every write may go now: the loop is about to stop with all three still pending

    def write(seed: int, path: Path) -> None:
        assert release.wait(WAIT_S)

    _request_loop(_Pipe(on_generate, write), jobs, control=None, rank=0)
    assert all(jobs.get(i).status in ("in_progress", "completed") for i in ids)
    jobs.wait_for_writes()
    assert [jobs.get(i).status for i in ids] == ["completed"] * 3
    assert [jobs.get(i).written_at for i in ids] == sorted(jobs.get(i).written_at for i in ids)  # FIFO
