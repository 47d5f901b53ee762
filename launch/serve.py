"""Serve videos over HTTP: `torchrun --nproc_per_node=N launch/serve.py key=value ...` (or plain `python`).

Rank 0 answers an OpenAI-style /v1/videos API on a thread (launch/video_jobs.py) and keeps a FIFO queue; every rank
runs the same request loop, receives each request from rank 0 (one `broadcast_object_list` per request or idle
poll), and generates it through the Python API; rank 0's writer thread writes `<server.output_dir>/<id>.mp4` and
`<id>.json` while the mesh already runs the next request.
Keys: launch/generate.py's (defaults of every request) plus `server.*`. SIGTERM/SIGINT drain, then exit 0.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tessera.launch.api import Video, VideoPipeline, load
from tessera.launch.config import TEXT_KEYS, parse_overrides, to_overrides
from tessera.launch.generate import user_error
from tessera.launch.video_jobs import STOP, STOP_REASONS, Job, VideoJobs
from tessera.launch.videos_http import build_http_server
from tessera.runtime.faults import FAULT_ENV, parse_fault_spec
from tessera.runtime.guards import Cancelled, Interrupted, NonFiniteLatentsError, RankFailure, is_peer_loss
from tessera.runtime.image_conditioning import request_image_path

EXIT_FAILURE = 1
POLL_S = 0.2  # rank 0's idle wait per broadcast: bounds how late an idle server notices a signal
# Request keys the server owns: a request may set the generation keys, attention.* and output.save_latents.
_LOAD_ONLY_GROUPS = ("model", "parallel")
_SERVER_OWNED = ("output.path", "output.overwrite", "prompts_file")
log = logging.getLogger("tessera")


def _key(default: Any, doc: str, example: str) -> Any:
    return field(default=default, metadata={"help": doc, "example": example})


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The `server.*` keys (parsed here; everything else goes to the Python API's `load`)."""

    host: str = _key("127.0.0.1", "address to bind; the API has no authentication: keep it on loopback or behind an "
                     "authenticating proxy", "0.0.0.0")
    port: int = _key(8000, "TCP port; 0 picks a free one (logged)", "0")
    output_dir: str = _key("outputs/server", "where rank 0 writes <id>.mp4, <id>.json (and latents)", "/data/videos")
    max_queue: int = _key(16, "jobs waiting beside the running one; a full queue answers 429", "64")
    drain_timeout_s: float = _key(20.0, "after SIGTERM the running job may finish within this, else it stops at the "
                                  "next step boundary (keep it below torchrun's --shutdown_timeout, 30 s)", "0")
    warmup: bool = _key(True, "run one request with the launch defaults before /health answers 200", "false")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port={self.port} must be 0..65535 (0: any free port). Fix: e.g. server.port=0.")
        if self.max_queue < 1:
            raise ValueError(f"server.max_queue={self.max_queue} must be >= 1. Fix: e.g. server.max_queue=16.")
        if not math.isfinite(self.drain_timeout_s) or self.drain_timeout_s < 0:
            raise ValueError(f"server.drain_timeout_s={self.drain_timeout_s} must be >= 0 seconds. Fix: e.g. "
                             "server.drain_timeout_s=20.")


def parse_server_args(argv: list[str]) -> tuple[ServerConfig, list[str]]:
    """(the `server.*` keys, the other arguments); ValueError/TypeError naming the key and the fix. Also refuses the
    keys the server sets per job (output.path, output.overwrite, prompts_file)."""
    known = {f.name: f for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    rest = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.strip().lstrip("+")
        if key in _SERVER_OWNED:
            raise ValueError(f"{key} is set by the server for every job (<server.output_dir>/<id>.mp4, never "
                             f"overwritten). Fix: drop {key}; choose the folder with server.output_dir=...")
        if not key.startswith("server."):
            rest.append(arg)
            continue
        name = key.removeprefix("server.")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
            hint = f" Did you mean server.{close[0]}?" if close else f" Server keys: {', '.join(known)}."
            raise ValueError(f"unknown config key {key!r}.{hint}")
        if not sep:
            example = known[name].metadata["example"]
            raise ValueError(f"argument {arg!r} is not of the form key=value (e.g. {key}={example}).")
        values[name] = _parse_value(key, value.strip(), known[name])
    cfg = ServerConfig(**values)
    cfg.validate()
    return cfg, rest


def _parse_value(key: str, value: str, spec: Any) -> Any:
    kind, fix = spec.type, f"Fix: e.g. {key}={spec.metadata['example']}."
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false"):
                raise ValueError
            return value.lower() == "true"
        return {"int": int, "float": float, "str": str}[kind](value)
    except ValueError:
        what = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(kind, kind)
        raise TypeError(f"{key}={value} must be {what}. {fix}") from None


def help_text() -> str:
    lines = ["usage: [torchrun --nproc_per_node=N] launch/serve.py [key=value ...]", "",
             "Serve an OpenAI-style /v1/videos API. Every key of launch/generate.py --help is accepted (model.*, "
             "parallel.*, attention.*, and generation keys as the defaults of every request), plus:", "", "server.*:"]
    for f in fields(ServerConfig):
        lines.append(f"  server.{f.name:<18}{f.metadata['help']} (default: {f.default})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    if any(arg in ("-h", "--help") for arg in argv):
        if rank == 0:
            print(help_text())
        return 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(message)s")
    guard = _SignalGuard()
    previous = {sig: signal.signal(sig, guard) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(argv, rank, guard)
    except Interrupted as err:  # while starting: the group is already destroyed
        if rank == 0 or err.phase is not None:
            print(f"error: rank {rank} interrupted by {signal.Signals(err.signum).name} while starting "
                  f"({err.phase or 'load'}); server stopped", file=sys.stderr, flush=True)
        return 128 + err.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _SignalGuard:
    """SIGINT/SIGTERM: while starting, raise `Interrupted` (unwind as the CLI does); once serving, call `on_stop`
    (rank 0 drains; the other ranks follow rank 0's broadcasts); a second signal exits at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.on_stop: Callable[[int], None] | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # impatient second signal: no more draining
        self.received = signum
        if self.on_stop is None:
            raise Interrupted(signum)
        self.on_stop(signum)


def _run(argv: list[str], rank: int, guard: _SignalGuard) -> int:
    try:
        server_cfg, load_argv = parse_server_args(argv)
        faults = parse_fault_spec(os.environ.get(FAULT_ENV, ""))  # test-only hook, parsed once (README)
        load_keys = dict(item.split("=", 1) for item in parse_overrides([*load_argv, *faults.overrides_for(rank)]))
        http, jobs = _start_http(server_cfg) if rank == 0 else (None, None)
    except (ValueError, TypeError) as err:
        return user_error(rank, err)
    try:
        try:
            pipe = load(faults=faults, **load_keys)  # validates first: a bad key fails on every rank, nothing loads
        except (ValueError, TypeError) as err:
            return user_error(rank, err)
        except Exception as err:
            return _report_failure(rank, RankFailure(rank, "load", err), jobs)
        with pipe:
            return _serve(pipe, server_cfg, jobs, rank, guard)
    finally:
        if http is not None:
            http.shutdown()
            http.server_close()


def _start_http(server_cfg: ServerConfig) -> tuple[Any, VideoJobs]:
    """Rank 0, before the model loads (/health answers 503 meanwhile): bind, serve on a thread, log the address."""
    output_dir = Path(server_cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ValueError(f"server.output_dir={server_cfg.output_dir} is not a writable folder ({err.strerror or err})."
                         f" Fix: e.g. server.output_dir=/data/videos") from None
    jobs = VideoJobs(output_dir, server_cfg.max_queue, server_cfg.drain_timeout_s, model="")
    try:
        http = build_http_server(jobs, server_cfg.host, server_cfg.port)
    except OSError as err:
        raise ValueError(f"server.host={server_cfg.host} server.port={server_cfg.port}: cannot bind "
                         f"({err.strerror or err}). Fix: another port, or server.port=0 for any free one") from None
    threading.Thread(target=http.serve_forever, name="http", daemon=True).start()
    host, port = http.server_address[:2]
    log.info("serving on http://%s:%d/v1/videos (pid %d); /health answers 503 until the model is loaded and warm",
             host, port, os.getpid())
    if not _is_loopback(server_cfg.host):
        log.warning("server.host=%s: the API has no authentication; anyone who reaches this port can create, read "
                    "and delete videos. Bind 127.0.0.1 and put an authenticating proxy in front.", server_cfg.host)
    return http, jobs


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(pipe: VideoPipeline, server_cfg: ServerConfig, jobs: VideoJobs | None, rank: int,
           guard: _SignalGuard) -> int:
    """Warm up, then the request loop until rank 0 says stop (0) or a rank fails (1)."""
    cfg = pipe.config
    control = None
    if dist.is_initialized() and dist.get_world_size() > 1:  # requests and stop flags, off the mesh's groups
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.parallel.timeout_s))
    try:
        if server_cfg.warmup:
            _warm_up(pipe, rank)
        if jobs is not None:
            jobs.model = cfg.model.path or cfg.model.preset
            jobs.ready(_RequestValidator(pipe, jobs.model))
            log.info("ready: POST /v1/videos")
        guard.on_stop = jobs.request_stop if jobs is not None else (lambda signum: None)
        try:
            _request_loop(pipe, jobs, control, rank)
        finally:
            if jobs is not None:
                jobs.wait_for_writes()  # stopping or failing: every generated job's files land (or fail) first
    except RankFailure as failure:
        return _report_failure(rank, failure, jobs, cfg.parallel.timeout_s)
    if jobs is not None:
        name = signal.Signals(jobs.stop_signal).name if jobs.stop_signal is not None else "stop"
        log.info("server stopped (%s): drained; %s", name, jobs.summary())
    return 0


def _warm_up(pipe: VideoPipeline, rank: int) -> None:
    """One request with the launch's defaults on every rank, nothing written: compiles, autotunes and fills the
    caches before /health says ready, so that the first user pays none of it (for requests of that shape)."""
    t0 = time.perf_counter()
    try:
        pipe.generate()
    except Exception as err:
        raise RankFailure(rank, f"warm-up {pipe.phase}", err) from err
    if rank == 0:
        log.info("warm-up request done in %.2f s", time.perf_counter() - t0)


def _request_loop(pipe: VideoPipeline, jobs: VideoJobs | None, control: Any, rank: int) -> None:
    """Every rank: take the next message from rank 0 (a request, STOP or None while idle) and run it."""
    while True:
        job = jobs.next_job(POLL_S) if jobs is not None else None
        request = {"id": job.id, "keys": job.keys} if isinstance(job, Job) else job
        if control is not None:
            box = [request]
            try:
                dist.broadcast_object_list(box, src=0, group=control)
            except Exception as err:
                raise RankFailure(rank, "waiting for a request", err) from err
            request = box[0]
        if request is None:
            continue
        if request == STOP:
            return
        _run_job(pipe, request, job if isinstance(job, Job) else None, jobs, control, rank)


def _run_job(pipe: VideoPipeline, request: dict, job: Job | None, jobs: VideoJobs | None, control: Any,
             rank: int) -> None:
    """One request on every rank; rank 0 (`job`, `jobs`) records a failure, or hands the files to its writer thread
    and returns to take the next request (the job completes once they are written). A failure that every rank
    sees alike (bad request, NaN/Inf, cancel) or that only rank 0 can have after the last collective (decode) fails
    the job; any other leaves the ranks out of step and raises RankFailure (the job group ends)."""
    if job is not None:
        log.info("job %s started", job.id)
    try:
        video = pipe.generate(on_step=_StepHook(jobs, job, control), **request["keys"])
    except Exception as err:
        outcome = _job_failure(err, pipe.phase, rank)
        if outcome is None:
            raise RankFailure(rank, pipe.phase, err) from err
        if job is not None:
            jobs.fail(job, *outcome)
        return
    if job is not None:
        jobs.write_in_background(job, partial(_save, video, job))


def _save(video: Video, job: Job) -> dict:
    """The writer thread: `job`'s mp4, JSON report (and latents), all or none; its report, the write timed in it."""
    video.save(job.video_path, save_latents=job.save_latents)
    return video.report


def _job_failure(err: Exception, phase: str, rank: int) -> tuple[str, str] | None:
    """(error code, message) of a failure that leaves the ranks in step, else None."""
    if isinstance(err, Cancelled):
        return "cancelled", str(err)
    if isinstance(err, NonFiniteLatentsError):
        return "nonfinite_latents", f"rank(s) {err.ranks} failed during step {err.step}: {err}"
    if isinstance(err, (ValueError, TypeError)) and phase == "config":  # validation: alike on every rank
        return "invalid_request", f"rank {rank} failed during config: {err}"
    if rank == 0 and phase == "decode":
        if not isinstance(err, OSError):
            traceback.print_exception(err)
        return "generation_failed", f"rank 0 failed during {phase}: {type(err).__name__}: {err}"
    return None


class _StepHook:
    """`on_step` of one job, on every rank: rank 0 records the progress and decides whether to stop; one tiny
    broadcast of that decision per step keeps the ranks in lockstep (a 4-byte gloo broadcast: well under a
    millisecond on one host, against ~0.4 s per 1.3B 480p step on a GPU)."""

    def __init__(self, jobs: VideoJobs | None, job: Job | None, control: Any) -> None:
        self.jobs, self.job, self.control = jobs, job, control

    def __call__(self, step: int, num_steps: int) -> None:
        decision = self.jobs.step_done(self.job, step, num_steps) if self.jobs is not None else 0
        if self.control is not None:
            flag = torch.tensor([decision], dtype=torch.int32)
            dist.broadcast(flag, src=0, group=self.control)
            decision = int(flag[0])
        if decision:
            reason = STOP_REASONS[decision].replace("{id}", self.job.id if self.job is not None else "{id}")
            raise Cancelled(step, reason)


class _RequestValidator:
    """Rank 0, on an HTTP thread: a request body -> (keys for `generate`, video-object fields, save_latents), with
    the CLI's errors (unknown keys with a suggestion, types, sizes, the memory pre-flight) plus the server's rules.
    OpenAI's create fields are accepted: `size` "WxH", `seconds` (at `output.fps`: the request's, else the served
    model's, 16 or 24 for TI2V-5B) and `model` naming the served model."""

    def __init__(self, pipe: VideoPipeline, model: str) -> None:
        self.pipe, self.model = pipe, model

    def __call__(self, body: dict, video_path: Path) -> tuple[dict, dict, bool]:
        keys = self._openai_fields(body)
        for key in TEXT_KEYS:
            if key in keys and not isinstance(keys[key], str):
                raise TypeError(f"{key} must be a JSON string, got {_json_type(keys[key])}. Fix: e.g. "
                                f'"{key}": "a red fox in snow"')
        for override in to_overrides(keys):
            name = override.partition("=")[0]
            if name.split(".")[0] in _LOAD_ONLY_GROUPS:
                raise ValueError(f"{name} is fixed when the server starts: a request cannot change it. Fix: drop "
                                 f"{name} from the request, or start the server with {name}=...")
            if name in _SERVER_OWNED:
                raise ValueError(f"{name} is set by the server (<server.output_dir>/<id>.mp4). Fix: drop {name}; "
                                 'ask for latents with {"output": {"save_latents": true}}')
        if "image" in keys:  # a path on the server, or base64 bytes written beside the video as <id>.image.<format>
            keys["image"] = request_image_path(keys["image"], video_path.with_name(f"{video_path.stem}.image"))
        keys["output.path"] = str(video_path)
        cfg = self.pipe.check(**keys)  # the config resolver's checks and this rank's memory pre-flight
        info = {"model": self.model, "prompt": cfg.prompt, "size": f"{cfg.width}x{cfg.height}",
                "seconds": f"{cfg.num_frames / cfg.output.fps:g}"}
        return keys, info, cfg.output.save_latents

    def _openai_fields(self, body: dict) -> dict:
        keys = dict(body)
        model = keys.pop("model", None)
        if isinstance(model, dict):
            keys["model"] = model  # model.* keys: refused by the caller, naming the key
        elif model is not None and model != self.model:
            raise ValueError(f"model={model!r}: this server serves {self.model!r}. Fix: drop model or set it to "
                             f"{self.model!r} (model.* is fixed when the server starts)")
        size = keys.pop("size", None)
        if size is not None:
            width, sep, height = str(size).partition("x")
            if not (sep and width.isdigit() and height.isdigit()) or {"width", "height"} & keys.keys():
                raise ValueError(f"size={size!r} must be 'WIDTHxHEIGHT' (e.g. '832x480') and not given beside width "
                                 "or height")
            keys.update(width=int(width), height=int(height))
        seconds = keys.pop("seconds", None)
        if seconds is not None:
            fps = _request_fps(keys, self.pipe.config.output.fps)
            try:
                frames = 4 * round(float(seconds) * fps / 4) + 1  # the VAE packs 4 frames per latent frame
            except (TypeError, ValueError):
                raise TypeError(f"seconds={seconds!r} must be a number of seconds (e.g. \"5\")") from None
            if "num_frames" in keys:
                raise ValueError(f"seconds and num_frames both given: give one (seconds becomes num_frames at {fps} "
                                 f"fps)")
            keys["num_frames"] = frames
        return keys


def _request_fps(keys: dict, served_fps: int) -> int:
    """The frame rate `seconds` converts at: the request's `output.fps` when it is a positive whole number (a bad
    one is refused, naming the key, when the request's config resolves), else the served model's."""
    fps = (keys.get("output") or {}).get("fps") if isinstance(keys.get("output"), dict) else None
    fps = keys.get("output.fps", fps)
    return fps if isinstance(fps, int) and not isinstance(fps, bool) and fps > 0 else served_fps


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _report_failure(rank: int, failure: RankFailure, jobs: VideoJobs | None, timeout_s: float = 0.0) -> int:
    """A rank failed while starting or serving: print the CLI's `error: rank R ... during <phase>` line; rank 0
    fails every pending job and says which in a final line. The job group ends (exit 1)."""
    cause, phase = failure.cause, failure.phase
    if is_peer_loss(cause):
        message = str(cause).splitlines()[0].split(". This is typically")[0]
        why = f"no answer within parallel.timeout_s={timeout_s:g} s" if "imed out" in message else "connection lost"
        line = (f"error: rank {rank} stopped during {phase}: another rank failed, was killed or hung ({why}); its "
                f"error is above or in torchrun's summary. [{message}]")
    else:
        if not isinstance(cause, (OSError, NonFiniteLatentsError)):
            traceback.print_exception(cause)
        line = f"error: rank {rank} failed during {phase}: {type(cause).__name__}: {cause}"
    print(line, file=sys.stderr, flush=True)
    if jobs is not None:
        failed = jobs.fail_pending("server_failed", line.removeprefix("error: "))
        print(f"error: server stopped: the job group ends; {len(failed)} unfinished job(s) failed: "
              f"{', '.join(failed) or 'none'}; {jobs.summary()}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


if __name__ == "__main__":
    exit_code = main()
    # torchrun SIGTERMs the other ranks once one exits: keep our exit code (not -15) during interpreter teardown.
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, signal.SIG_IGN)
    sys.exit(exit_code)
