"""The server's HTTP layer: the OpenAI-style /v1/videos API, /health and /metrics over a `VideoJobs` table.

Standard library only. Handler threads parse and route; every state change goes through `VideoJobs` (its lock),
so a handler never touches a job the mesh is running. `launch/serve.py` binds it with `build_http_server`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from tessera.launch.video_jobs import Job, JobError, VideoJobs

__all__ = ["MAX_BODY_BYTES", "build_http_server"]

MAX_BODY_BYTES = 1 << 20
_JOB_PATH = re.compile(r"^/v1/videos/(?P<id>[A-Za-z0-9_-]+)(?P<content>/content)?$")
log = logging.getLogger("tessera")


def build_http_server(jobs: VideoJobs, host: str, port: int) -> ThreadingHTTPServer:
    """Bind (OSError when the address is taken); the caller runs `serve_forever` on a thread."""
    handler = type("VideosHandler", (_VideosHandler,), {"jobs": jobs})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


class _VideosHandler(BaseHTTPRequestHandler):
    jobs: VideoJobs
    server_version = "tessera"

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def do_DELETE(self) -> None:
        self._answer(self._delete)

    def _answer(self, route: Callable[[str, dict], tuple[int, Any]]) -> None:
        path, _, query = self.path.partition("?")
        try:
            status, payload = route(path.rstrip("/") or "/", parse_qs(query))
        except JobError as err:
            status, payload = err.status, err.body()
        except Exception as err:  # noqa: BLE001 - a bug answers 500 and is logged; the server carries on
            log.exception("error answering %s %s", self.command, self.path)
            status, payload = 500, JobError(500, f"{type(err).__name__}: {err}", "internal_error").body()
        if isinstance(payload, Path):
            self._send_file(status, payload)
        elif isinstance(payload, str):
            self._send(status, payload.encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(status, json.dumps(payload).encode(), "application/json")

    def _get(self, path: str, query: dict) -> tuple[int, Any]:
        if path == "/health":
            return self.jobs.health()
        if path == "/metrics":
            return 200, self.jobs.metrics()
        if path == "/v1/videos":
            limit, order = query.get("limit", ["20"])[0], query.get("order", ["desc"])[0]
            if not limit.isdigit() or not 1 <= int(limit) <= 100 or order not in ("asc", "desc"):
                raise JobError(400, f"limit={limit} order={order}: limit must be 1..100 and order asc or desc",
                               "invalid_request", "limit")
            data = [job.to_json() for job in self.jobs.recent(int(limit), order)]
            return 200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": False}
        job, content = self._job(path)
        if not content:
            return 200, job.to_json()
        if job.status != "completed" or not job.video_path.exists():
            raise JobError(404, f"video {job.id} is {job.status}: its content exists once it is completed",
                           "not_ready", "id")
        return 200, job.video_path

    def _post(self, path: str, query: dict) -> tuple[int, Any]:
        if path != "/v1/videos":
            known = _JOB_PATH.match(path) is not None
            raise JobError(405 if known else 404, f"POST {path} is not an endpoint: POST /v1/videos creates a video",
                           "method_not_allowed" if known else "not_found")
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            raise JobError(400, f"Content-Length: {length} is not a byte count", "invalid_request")
        length = int(length)
        if length > MAX_BODY_BYTES:
            raise JobError(413, f"the body is {length} bytes; at most {MAX_BODY_BYTES}", "body_too_large")
        return 202, self.jobs.submit(self.rfile.read(length))

    def _delete(self, path: str, query: dict) -> tuple[int, Any]:
        job, content = self._job(path)
        if content:
            raise JobError(405, "DELETE /v1/videos/{id} deletes a video; its /content has no DELETE",
                           "method_not_allowed")
        return self.jobs.delete(job.id)

    def _job(self, path: str) -> tuple[Job, bool]:
        match = _JOB_PATH.match(path)
        if match is None:
            raise JobError(404, f"{path} is not an endpoint: /v1/videos, /v1/videos/{{id}}, "
                           "/v1/videos/{id}/content, /health, /metrics", "not_found")
        return self.jobs.get(match["id"]), match["content"] is not None

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self._headers(status, len(data), content_type)
        self.wfile.write(data)

    def _send_file(self, status: int, path: Path) -> None:
        try:
            handle = open(path, "rb")  # opened before the headers: a DELETE racing the download answers 404
        except FileNotFoundError:
            error = JobError(404, f"{path.name} was deleted", "not_found", "id")
            self._send(404, json.dumps(error.body()).encode(), "application/json")
            return
        with handle:
            self._headers(status, os.fstat(handle.fileno()).st_size, "video/mp4")
            shutil.copyfileobj(handle, self.wfile)

    def _headers(self, status: int, length: int, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        if status in (429, 503):
            self.send_header("Retry-After", "5")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
