"""The server's rank-0 side: the job table, its FIFO queue and /metrics (the HTTP layer: launch/videos_http.py).

Standard library only. `launch/serve.py` owns the model and the ranks: it hands `VideoJobs` a validator once the
model is warm, takes jobs with `next_job`, reports each step (`step_done`, which also says whether to stop) and a
failure, and hands each generated job's file write to `write_in_background`: one writer thread writes them in FIFO
order while the mesh runs the next job, and completes (or fails) each job once its files are written. HTTP handler
threads only read and queue; the running job changes state in the main thread, a job being written in the writer's.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["STOP", "Job", "JobError", "VideoJobs"]

STOP = "stop"  # what `next_job` returns once the server drains
# Why the running job stops at the next step boundary (broadcast to every rank as this integer).
KEEP_GOING, CANCEL, SHUTDOWN = 0, 1, 2
STOP_REASONS = {CANCEL: "cancelled by DELETE /v1/videos/{id}", SHUTDOWN: "cancelled: the server is shutting down"}
MAX_FINISHED_JOBS = 1000  # older finished jobs leave the table (their files stay in server.output_dir)
# Generated jobs whose files wait for the writer: one more blocks the mesh until one is written (a 480x832x81 video
# holds ~100 MB of frames in host memory until then).
MAX_PENDING_WRITES = 4
log = logging.getLogger("tessera")

# (keys for VideoPipeline.generate, fields shown in the video object, save_latents) of a valid request body.
Validator = Callable[[dict, Path], tuple[dict, dict, bool]]


class JobError(Exception):
    """An HTTP error answer: status, OpenAI-style `error` object (message, type, code, param)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


@dataclass
class Job:
    id: str
    keys: dict  # the request as VideoPipeline.generate(**keys) takes it, output.path included
    info: dict  # model, prompt, size, seconds: shown in the video object
    video_path: Path
    save_latents: bool
    created_at: int = field(default_factory=lambda: int(time.time()))
    queued_at: float = field(default_factory=time.monotonic)
    status: str = "queued"  # queued | in_progress (generating, then writing its files) | completed | failed
    progress: int = 0
    completed_at: int | None = None
    error: dict | None = None
    cancel_requested: bool = False
    # time.monotonic() when the mesh took the job, when it handed the files to the writer, when they were written
    started_at: float | None = None
    generated_at: float | None = None
    written_at: float | None = None

    def to_json(self) -> dict:
        """The OpenAI Videos API `video` object."""
        return {"id": self.id, "object": "video", "created_at": self.created_at, "status": self.status,
                "progress": self.progress, **self.info, "completed_at": self.completed_at, "error": self.error}

    def files(self) -> list[Path]:
        """Every file the job may have written: the video, its report, the latents."""
        return [self.video_path, self.video_path.with_suffix(".json"),
                self.video_path.with_suffix(".latents.safetensors")]


class VideoJobs:
    """Jobs by id, the FIFO queue (at most `max_queue` waiting beside the running job) and the counters of
    /metrics. Thread-safe; `request_stop` is signal-handler-safe (it only assigns)."""

    def __init__(self, output_dir: Path, max_queue: int, drain_timeout_s: float, model: str) -> None:
        self.output_dir, self.max_queue, self.model = output_dir, max_queue, model
        self.drain_timeout_s = drain_timeout_s
        self._cond = threading.Condition()
        self._validate_lock = threading.Lock()  # OmegaConf resolution is not known to be thread-safe
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._writing: list[Job] = []  # generated, files not written yet (FIFO)
        self._writer = _Writer(self._write_job)
        self._validator: Validator | None = None
        self._draining = False
        self.running: Job | None = None
        self.stop_signal: int | None = None
        self._stop_at = 0.0
        self._counts = {"completed": 0, "failed": 0, "rejected": 0}
        self._stage_seconds: dict[str, list[float]] = {}  # stage -> [sum, count]
        self._steps = {"total": 0, "per_second": 0.0}

    # -- the main thread (rank 0's request loop) -------------------------------------------------------------------

    def ready(self, validator: Validator) -> None:
        """The model is loaded and warm: accept requests, /health answers 200."""
        self._validator = validator

    def request_stop(self, signum: int) -> None:
        """SIGTERM/SIGINT arrived: refuse new jobs now; the loop drains at its next poll or step boundary."""
        self._stop_at, self.stop_signal = time.monotonic(), signum

    def next_job(self, timeout_s: float) -> Job | str | None:
        """The next queued job (now in progress), STOP once draining, or None after `timeout_s` without one."""
        with self._cond:
            if not self._queue and not self._drain_if_stopping():
                self._cond.wait(timeout_s)
            if self._drain_if_stopping():
                return STOP
            if not self._queue:
                return None
            job = self.running = self._queue.popleft()
            job.status, job.started_at = "in_progress", time.monotonic()
            self._add_seconds("queue", time.monotonic() - job.queued_at)
            return job

    def step_done(self, job: Job, step: int, num_steps: int) -> int:
        """Record the progress of the running job after denoising step `step` (0-based); returns KEEP_GOING,
        CANCEL (DELETE asked for it) or SHUTDOWN (a signal came and server.drain_timeout_s has passed)."""
        job.progress = min(99, 100 * (step + 1) // num_steps)  # 100 once written
        with self._cond:
            self._drain_if_stopping()
        if job.cancel_requested:
            return CANCEL
        if self.stop_signal is not None and time.monotonic() - self._stop_at >= self.drain_timeout_s:
            return SHUTDOWN
        return KEEP_GOING

    def write_in_background(self, job: Job, write: Callable[[], dict]) -> None:
        """The mesh is done with `job` and may take the next one: the writer thread runs `write` (it writes the
        job's files and returns its report, stage seconds with the write included) after every write handed over
        before it. The job stays in_progress (progress 99) until then, and is completed once `write` returns or
        failed (code write_failed) naming its error. Blocks while MAX_PENDING_WRITES jobs wait for the writer."""
        with self._cond:
            job.generated_at, job.progress = time.monotonic(), 99
            if self.running is job:
                self.running = None
            self._writing.append(job)
        self._writer.put(job, write)

    def wait_for_writes(self) -> None:
        """Return once every write handed over is done (shutdown, or the job group failing): the last jobs complete
        or fail before the server says what it leaves behind."""
        self._writer.close()

    def _write_job(self, job: Job, write: Callable[[], dict]) -> None:
        """The writer thread: one job's files, then its outcome."""
        if job.cancel_requested:  # DELETE came while it waited for the writer
            job.written_at = time.monotonic()
            self.fail(job, "cancelled", "cancelled by DELETE /v1/videos/{id} before its files were written")
            return
        try:
            report = write()
        except Exception as err:  # noqa: BLE001 - the job fails alone; the writer carries on with the next
            job.written_at = time.monotonic()
            if not isinstance(err, (OSError, ValueError)):  # a disk or path problem needs no traceback
                log.error("job %s: writing its files failed", job.id, exc_info=err)
            self.fail(job, "write_failed", f"rank 0 failed during write: {type(err).__name__}: {err}")
            return
        job.written_at = time.monotonic()
        self.complete(job, report)
        log.info("job %s completed in %.2f s (files written %.2f s after its generation ended)", job.id,
                 report.get("total_seconds") or 0.0, job.written_at - job.generated_at)

    def complete(self, job: Job, report: dict) -> None:
        steps, denoise = len(report.get("step_seconds", [])), report.get("denoise_seconds") or 0.0
        with self._cond:
            job.status, job.progress, job.completed_at = "completed", 100, int(time.time())
            self._finish(job, "completed")
            for stage, seconds in report.get("stage_seconds", {}).items():
                if seconds is not None:
                    self._add_seconds(stage, seconds)
            self._steps["total"] += steps
            self._steps["per_second"] = steps / denoise if denoise > 0 else 0.0

    def fail(self, job: Job, code: str, message: str) -> None:
        with self._cond:
            job.status, job.completed_at, job.error = "failed", int(time.time()), {"code": code, "message": message}
            self._finish(job, "failed")
        log.warning("job %s failed: %s", job.id, message)

    def fail_pending(self, code: str, message: str) -> list[str]:
        """Fail the running job and every queued one (the job group is going down); their ids."""
        with self._cond:
            running, queued = self.running, list(self._queue)
            self._queue.clear()
        if running is not None:
            self.fail(running, code, message)
        for job in queued:
            self.fail(job, code, f"not started: the server stopped ({message})")
        return [job.id for job in ([running] if running is not None else []) + queued]

    def summary(self) -> str:
        with self._cond:
            counts = dict(self._counts)
        return ", ".join(f"{n} {outcome}" for outcome, n in counts.items())

    def _drain_if_stopping(self) -> bool:
        """Under the lock: after a signal, fail the queued jobs once; True while draining."""
        if self.stop_signal is not None and not self._draining:
            self._draining = True
            queued = list(self._queue)
            self._queue.clear()
            for job in queued:
                job.status, job.completed_at = "failed", int(time.time())
                job.error = {"code": "server_shutdown", "message": "not started: the server is shutting down"}
                self._finish(job, "failed")
            log.info("draining: new requests get 503; queued jobs failed: %s%s",
                     ", ".join(job.id for job in queued) or "none",
                     "" if self.running is None else f"; {self.running.id} may run {self.drain_timeout_s:g} s more")
        return self._draining

    def _finish(self, job: Job, outcome: str) -> None:
        if self.running is job:
            self.running = None
        if job in self._writing:
            self._writing.remove(job)
        self._counts[outcome] += 1
        finished = [j for j in self._jobs.values() if j.status in ("completed", "failed")]
        for old in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[old.id]

    def _add_seconds(self, stage: str, seconds: float) -> None:
        total = self._stage_seconds.setdefault(stage, [0.0, 0])
        total[0] += seconds
        total[1] += 1

    # -- HTTP handler threads ---------------------------------------------------------------------------------------

    def health(self) -> tuple[int, dict]:
        if self.stop_signal is not None:
            return 503, {"status": "draining"}
        if self._validator is None:
            return 503, {"status": "loading"}
        return 200, {"status": "ok", "model": self.model, "queued": len(self._queue),
                     "in_progress": int(self.running is not None), "writing": len(self._writing)}

    def submit(self, raw: bytes) -> dict:
        """Parse, validate and queue a request body; the queued job's video object (JobError: 400 bad request, 429
        full queue, 503 loading or draining). Validation runs here, on the HTTP thread: a bad request never reaches
        the ranks."""
        self._refuse_unless_accepting()
        try:
            body = json.loads(raw or b"{}")
        except ValueError as err:
            raise self._rejected(400, f"the body is not valid JSON ({err}). Fix: send a JSON object such as "
                                 '{"prompt": "a red fox in snow", "seed": 3}', "invalid_json") from None
        if not isinstance(body, dict):
            raise self._rejected(400, 'the body must be a JSON object of request keys, e.g. {"prompt": "a red fox '
                                 'in snow", "seed": 3}', "invalid_request")
        job_id = f"video_{secrets.token_hex(12)}"
        path = self.output_dir / f"{job_id}.mp4"
        try:
            with self._validate_lock:
                keys, info, save_latents = self._validator(body, path)
        except (ValueError, TypeError) as err:
            raise self._rejected(400, str(err), "invalid_request", _named_key(str(err))) from None
        job = Job(job_id, keys, info, path, save_latents)
        with self._cond:
            self._refuse_unless_accepting()
            if len(self._queue) >= self.max_queue:
                raise self._rejected(429, f"the queue is full ({self.max_queue} jobs waiting beside the running one): "
                                     "retry later, or start the server with a larger server.max_queue",
                                     "queue_full")
            self._jobs[job_id] = job
            self._queue.append(job)
            self._cond.notify_all()
            queued = job.to_json()
        log.info("job %s queued (%d waiting)", job_id, len(self._queue))
        return queued

    def _refuse_unless_accepting(self) -> None:
        if self.stop_signal is not None:
            raise self._rejected(503, "the server is shutting down and accepts no new jobs", "server_shutdown")
        if self._validator is None:
            raise self._rejected(503, "the model is still loading: retry once GET /health answers 200", "loading")

    def _rejected(self, status: int, message: str, code: str, param: str | None = None) -> JobError:
        with self._cond:
            self._counts["rejected"] += 1
        return JobError(status, message, code, param)

    def get(self, job_id: str) -> Job:
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobError(404, f"no video {job_id!r} (finished jobs are kept for the last {MAX_FINISHED_JOBS})",
                           "not_found", "id")
        return job

    def recent(self, limit: int, order: str) -> list[Job]:
        with self._cond:
            jobs = list(self._jobs.values())
        return (jobs if order == "asc" else jobs[::-1])[:limit]

    def delete(self, job_id: str) -> tuple[int, dict]:
        """Cancel a queued job (200), ask the running one to stop at its next step boundary or a generated one not
        to be written if its write has not started (202), or delete a finished one's files and entry (200,
        `video.deleted`)."""
        job = self.get(job_id)
        with self._cond:
            if job.status == "queued":
                self._queue.remove(job)
                job.status, job.completed_at = "failed", int(time.time())
                job.error = {"code": "cancelled", "message": "cancelled by DELETE /v1/videos/{id} before it started"}
                self._finish(job, "failed")
                return 200, job.to_json()
            if job.status == "in_progress":
                job.cancel_requested = True
                return 202, job.to_json()
            del self._jobs[job_id]
        for path in job.files():
            path.unlink(missing_ok=True)
        return 200, {"id": job_id, "object": "video.deleted", "deleted": True}

    def metrics(self) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        with self._cond:
            counts, stages, steps = dict(self._counts), {k: list(v) for k, v in self._stage_seconds.items()}, dict(
                self._steps)
            queued, running, writing = len(self._queue), int(self.running is not None), len(self._writing)
        lines = ["# HELP tessera_requests_total Video requests by outcome (rejected: refused at POST with 4xx/503).",
                 "# TYPE tessera_requests_total counter"]
        lines += [f'tessera_requests_total{{status="{status}"}} {n}' for status, n in counts.items()]
        lines += ["# HELP tessera_queue_depth Jobs waiting beside the running one.", "# TYPE tessera_queue_depth gauge",
                  f"tessera_queue_depth {queued}", "# HELP tessera_jobs_in_progress Jobs on the mesh (0 or 1).",
                  "# TYPE tessera_jobs_in_progress gauge", f"tessera_jobs_in_progress {running}",
                  "# HELP tessera_jobs_writing Generated jobs whose files are being written (the mesh runs on).",
                  "# TYPE tessera_jobs_writing gauge", f"tessera_jobs_writing {writing}",
                  "# HELP tessera_stage_seconds Seconds per stage of finished jobs (queue: waiting to start).",
                  "# TYPE tessera_stage_seconds summary"]
        for stage, (total, count) in stages.items():
            lines += [f'tessera_stage_seconds_sum{{stage="{stage}"}} {total:.6f}',
                      f'tessera_stage_seconds_count{{stage="{stage}"}} {count}']
        lines += ["# HELP tessera_denoise_steps_total Denoising steps of completed jobs.",
                  "# TYPE tessera_denoise_steps_total counter", f"tessera_denoise_steps_total {steps['total']}",
                  "# HELP tessera_steps_per_second Denoising steps per second of the last completed job.",
                  "# TYPE tessera_steps_per_second gauge", f"tessera_steps_per_second {steps['per_second']:.6f}"]
        return "\n".join(lines) + "\n"


class _Writer:
    """One thread that runs `write_job(job, write)` for each handed-over job in FIFO order, started at the first;
    `close` waits for every one handed over (a later `put` starts a new thread)."""

    def __init__(self, write_job: Callable[[Job, Callable[[], dict]], None]) -> None:
        self._write_job = write_job
        self._pending: queue.Queue[tuple[Job, Callable[[], dict]] | None] = queue.Queue(MAX_PENDING_WRITES)
        self._thread: threading.Thread | None = None

    def put(self, job: Job, write: Callable[[], dict]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
            self._thread.start()
        self._pending.put((job, write))

    def close(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            self._write_job(*item)


def _named_key(message: str) -> str | None:
    """The config key an error message starts with ("seed=abc must be ...", "unknown config key 'x'"), if any."""
    match = re.match(r"unknown config key '([\w.]+)'|([a-z_]+(?:\.[a-z_]+)*)(?:=|\s(?:must|is|has|and)\s)", message)
    return None if match is None else match.group(1) or match.group(2)
