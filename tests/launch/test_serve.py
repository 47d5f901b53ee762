"""The video server (`launch/serve.py`) as a user meets it: a real 2-rank torchrun job (gloo, CPU) and a real HTTP
client. One server serves the whole module (started once, ~10 s); the last test drains it with SIGTERM. A second,
short-lived server checks that a rank that dies ends the job group.

Faults come from the test-only TESSERA_FAULT hook; `seed=S` limits a fault to the requests with that seed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LOAD_ARGS = ["parallel.sp=2", "num_frames=13", "height=64", "width=64", "num_steps=2", "attention.backend=dense"]
SLOW_SEED = 77  # sleeps 3 s in step 0 on every rank: keeps the runner busy
FAULTS = f"nan@step=1,seed=13;raise@phase=decode,seed=14;sleep@step=0,seed={SLOW_SEED},seconds=3"
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 60.0


@dataclass
class Server:
    proc: subprocess.Popen
    log_path: Path
    out_dir: Path
    url: str = ""
    pid: int = 0  # rank 0's process

    def log(self) -> str:
        return self.log_path.read_text(errors="replace").replace("\r", "\n")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any, dict]:
        """(status, JSON or bytes, headers); 4xx/5xx answers are returned, not raised."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as answer:
                status, raw, headers = answer.status, answer.read(), dict(answer.headers)
        except urllib.error.HTTPError as err:
            status, raw, headers = err.code, err.read(), dict(err.headers)
        is_json = headers.get("Content-Type", "").startswith("application/json")
        return status, json.loads(raw) if is_json else raw, headers

    def post(self, body: Any) -> dict:
        status, job, _ = self.request("POST", "/v1/videos", body)
        assert status == 202 and job["status"] == "queued", (status, job)
        return job

    def wait_for(self, job_id: str, statuses: tuple[str, ...] = ("completed", "failed")) -> dict:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            status, job, _ = self.request("GET", f"/v1/videos/{job_id}")
            assert status == 200, job
            if job["status"] in statuses:
                return job
            assert self.proc.poll() is None, f"server exited:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"{job_id} still {job['status']}:\n{self.log()[-3000:]}"
            time.sleep(0.05)

    def files(self) -> list[str]:
        return sorted(p.name for p in self.out_dir.iterdir())

    def wait_exit(self, timeout_s: float = 60.0) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server still running after {timeout_s} s:\n{self.log()[-3000:]}") from None
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_server(tmp_path: Path, *args: str, fault: str = "", wait_ready: bool = True) -> Server:
    out_dir = tmp_path / "videos"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "serve.py"), *LOAD_ARGS, "server.port=0", f"server.output_dir={out_dir}",
           "parallel.timeout_s=20", *args]
    env = {**os.environ, "TESSERA_FAULT": fault, "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, log_path, out_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (found := re.search(r"serving on (http://[\d.]+:\d+)/v1/videos \(pid (\d+)\)", server.log())):
        assert proc.poll() is None and time.monotonic() < deadline, f"no address logged:\n{server.log()[-3000:]}"
        time.sleep(0.1)
    server.url, server.pid = found[1], int(found[2])
    while wait_ready and server.request("GET", "/health")[0] != 200:
        assert proc.poll() is None and time.monotonic() < deadline, f"never ready:\n{server.log()[-3000:]}"
        time.sleep(0.1)
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve"), "server.max_queue=3", "server.drain_timeout_s=0",
                          fault=FAULTS)
    yield server
    server.kill()


def _no_temp_files(server: Server) -> None:
    assert not [name for name in server.files() if ".tmp-" in name], server.files()


def test_health_list_and_metrics(server):
    status, health, _ = server.request("GET", "/health")
    assert status == 200 and health["model"] == "wan-tiny"
    status, listing, _ = server.request("GET", "/v1/videos?limit=5")
    assert status == 200 and listing["object"] == "list"
    assert server.request("GET", "/v1/videos?limit=0")[0] == 400
    status, metrics, headers = server.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "tessera_queue_depth 0" in metrics.decode() and 'tessera_requests_total{status="completed"}' in \
        metrics.decode()


def test_three_concurrent_posts_complete_in_order(server, tmp_path):
    with ThreadPoolExecutor(3) as pool:
        jobs = list(pool.map(server.post, [{"prompt": f"fox number {i}", "seed": i} for i in (1, 2, 3)]))
    ids = [job["id"] for job in jobs]
    done = [server.wait_for(job_id) for job_id in ids]
    assert [job["status"] for job in done] == ["completed"] * 3 and all(job["progress"] == 100 for job in done)
    log = server.log()
    queued = [i for i in re.findall(r"job (video_\w+) queued", log) if i in ids]
    started = [i for i in re.findall(r"job (video_\w+) started", log) if i in ids]
    assert started == queued and sorted(queued) == sorted(ids)  # FIFO
    for job_id in ids:
        status, content, headers = server.request("GET", f"/v1/videos/{job_id}/content")
        assert status == 200 and headers["Content-Type"] == "video/mp4"
        (tmp_path / f"{job_id}.mp4").write_bytes(content)
        assert iio.imread(tmp_path / f"{job_id}.mp4").shape == (13, 64, 64, 3)


def test_same_request_twice_is_bit_identical_and_equals_the_cli(server, tmp_path):
    body = {"prompt": "a red fox in snow", "seed": 5, "guidance_scale": 4.0, "output": {"save_latents": True}}
    ids = [server.post(body)["id"] for _ in range(2)]
    assert [server.wait_for(i)["status"] for i in ids] == ["completed"] * 2
    first, second = (load_file(str(server.out_dir / f"{i}.latents.safetensors"))["latents"] for i in ids)
    assert torch.equal(first, second)
    report = json.loads((server.out_dir / f"{ids[0]}.json").read_text())
    assert report["config"]["seed"] == 5 and report["world_size"] == 2

    out = tmp_path / "cli.mp4"
    cli = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "launch" / "generate.py"), *LOAD_ARGS, "prompt=a red fox in snow", "seed=5",
                          "guidance_scale=4.0", f"output.path={out}", "output.save_latents=true"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert torch.equal(load_file(str(out.with_suffix(".latents.safetensors")))["latents"], first)


@pytest.mark.parametrize(("body", "needle", "param"), [
    (b"{not json", "not valid JSON", None),
    (b"[1, 2]", "must be a JSON object", None),
    ({"num_step": 3}, "unknown config key 'num_step'. Did you mean num_steps?", "num_step"),
    ({"seed": "abc"}, "seed=abc must be a whole number. Fix: e.g. seed=42.", "seed"),
    ({"prompt": 3}, "prompt must be a JSON string", "prompt"),
    ({"num_frames": 10}, "num_frames=10 must be 4k+1", "num_frames"),
    ({"num_frames": 100001, "height": 16384, "width": 16384}, "needs about", "num_frames"),
    ({"attention": {"sparsity": 1.5}}, "attention.sparsity=1.5 must lie in [0, 1)", "attention.sparsity"),
    ({"model": {"dtype": "bfloat16"}}, "model.dtype is fixed when the server starts", "model.dtype"),
    ({"parallel.sp": 1}, "parallel.sp is fixed when the server starts", "parallel.sp"),
    ({"output": {"path": "/tmp/x.mp4"}}, "output.path is set by the server", "output.path"),
    ({"model": "sora-2"}, "this server serves 'wan-tiny'", "model"),
    ({"size": "big"}, "must be 'WIDTHxHEIGHT'", "size"),
])
def test_bad_request_gets_400_naming_the_field(server, body, needle, param):
    status, answer, _ = server.request("POST", "/v1/videos", body)
    assert status == 400, answer
    assert needle in answer["error"]["message"] and answer["error"]["param"] == param, answer


def test_the_server_carries_on_after_bad_requests_and_takes_openai_fields(server):
    job = server.post({"model": "wan-tiny", "prompt": "a grey wolf", "size": "64x48", "seconds": "0.75"})
    assert job["size"] == "64x48" and job["seconds"] == "0.8125"  # 0.75 s at 16 fps -> 13 frames (4k+1)
    assert server.wait_for(job["id"])["status"] == "completed"
    assert server.request("GET", "/v1/videos/video_nope")[0] == 404
    status, metrics, _ = server.request("GET", "/metrics")
    assert int(re.search(rb'tessera_requests_total\{status="rejected"\} (\d+)', metrics)[1]) >= 1


def test_injected_faults_fail_only_their_job(server):
    nan, decode, fine = (server.post({"seed": seed})["id"] for seed in (13, 14, 4))
    nan_job, decode_job, fine_job = (server.wait_for(i) for i in (nan, decode, fine))
    assert nan_job["status"] == "failed" and nan_job["error"]["code"] == "nonfinite_latents"
    assert "rank(s) [0, 1] failed during step 1" in nan_job["error"]["message"]
    assert decode_job["status"] == "failed" and decode_job["error"]["code"] == "generation_failed"
    assert "rank 0 failed during decode: InjectedFault" in decode_job["error"]["message"]
    assert fine_job["status"] == "completed"
    assert not [name for name in server.files() if name.startswith((nan, decode))]  # no partial files
    assert server.request("GET", f"/v1/videos/{nan}/content")[0] == 404
    _no_temp_files(server)


def test_a_failing_write_fails_its_job_and_the_server_carries_on(server):
    # While the slow job generates (3 s in step 0), its mp4 path becomes a directory: the writer's check refuses it
    # (a real error, also as root). The next job was queued behind it and completes.
    slow = server.post({"seed": SLOW_SEED})["id"]
    server.wait_for(slow, ("in_progress",))
    (server.out_dir / f"{slow}.mp4").mkdir()
    after = server.post({"seed": 6})["id"]
    failed, completed = server.wait_for(slow), server.wait_for(after)
    assert failed["status"] == "failed" and failed["error"]["code"] == "write_failed", failed
    assert failed["error"]["message"].startswith("rank 0 failed during write: ValueError: output.path=")
    assert "is a directory" in failed["error"]["message"]
    assert completed["status"] == "completed"
    assert server.request("GET", f"/v1/videos/{slow}/content")[0] == 404
    assert [name for name in server.files() if name.startswith(slow)] == [f"{slow}.mp4"]  # only our directory
    (server.out_dir / f"{slow}.mp4").rmdir()
    _no_temp_files(server)


def test_full_queue_gets_429_and_delete_cancels_queued_and_running_jobs(server):
    slow = server.post({"seed": SLOW_SEED})["id"]
    server.wait_for(slow, ("in_progress",))
    queued = [server.post({"seed": 20 + i})["id"] for i in range(3)]  # server.max_queue=3
    status, answer, headers = server.request("POST", "/v1/videos", {"seed": 30})
    assert status == 429 and answer["error"]["code"] == "queue_full" and headers["Retry-After"] == "5"

    status, cancelled, _ = server.request("DELETE", f"/v1/videos/{queued[0]}")
    assert status == 200 and cancelled["status"] == "failed" and cancelled["error"]["code"] == "cancelled"
    assert server.request("GET", f"/v1/videos/{queued[0]}/content")[0] == 404
    status, running, _ = server.request("DELETE", f"/v1/videos/{slow}")  # stops at the next step boundary
    assert status == 202 and running["status"] == "in_progress"
    slow_job = server.wait_for(slow)
    assert slow_job["status"] == "failed" and slow_job["error"]["code"] == "cancelled"
    assert "after denoising step 0" in slow_job["error"]["message"]
    assert [server.wait_for(i)["status"] for i in queued[1:]] == ["completed", "completed"]
    assert not [name for name in server.files() if name.startswith((slow, queued[0]))]


def test_delete_of_a_finished_job_removes_its_files(server):
    job_id = server.post({"seed": 8, "output": {"save_latents": True}})["id"]
    server.wait_for(job_id)
    assert len([name for name in server.files() if name.startswith(job_id)]) == 3
    status, answer, _ = server.request("DELETE", f"/v1/videos/{job_id}")
    assert status == 200 and answer == {"id": job_id, "object": "video.deleted", "deleted": True}
    assert not [name for name in server.files() if name.startswith(job_id)]
    assert server.request("GET", f"/v1/videos/{job_id}")[0] == 404


def test_sigterm_drains_and_exits_0(server):  # last: it stops the module's server
    slow = server.post({"seed": SLOW_SEED})["id"]
    server.wait_for(slow, ("in_progress",))
    waiting = server.post({"seed": 9})["id"]
    os.kill(server.pid, signal.SIGTERM)  # rank 0 decides; the other ranks follow its broadcasts
    deadline = time.monotonic() + 5  # the handler runs once rank 0's main thread is back in Python
    while server.request("GET", "/health")[0] != 503:
        assert time.monotonic() < deadline, "still healthy after SIGTERM"
        time.sleep(0.05)
    status, answer, _ = server.request("POST", "/v1/videos", {"seed": 10})
    assert status == 503 and answer["error"]["code"] == "server_shutdown"
    code, seconds = server.wait_exit()
    log = server.log()
    assert code == 0, log[-3000:]
    assert f"queued jobs failed: {waiting}" in log
    assert f"job {slow} failed: cancelled: the server is shutting down after denoising step 0" in log
    assert "server stopped (SIGTERM): drained" in log and seconds < 30
    _no_temp_files(server)


def test_a_rank_that_dies_ends_the_job_group(tmp_path):
    # rank 1 kills itself at step 0; rank 0 first sleeps 1 s there, so the second job is surely queued by then
    fault = "kill@step=0,rank=1,seed=66;sleep@step=0,rank=0,seed=66,seconds=1"
    server = start_server(tmp_path, "server.warmup=false", fault=fault)
    try:
        doomed, waiting = server.post({"seed": 66})["id"], server.post({"seed": 1})["id"]
        code, seconds = server.wait_exit()
    finally:
        server.kill()
    log = server.log()
    assert code != 0 and seconds < 30, log[-3000:]
    assert re.search(r"error: rank 0 stopped during (step 0|waiting for a request): another rank failed", log), \
        log[-3000:]
    assert f"2 unfinished job(s) failed: {doomed}, {waiting}" in log, log[-3000:]
    assert server.files() == []


def test_bad_server_keys_fail_before_loading(tmp_path):
    for arg, needle in [("server.prot=1", "unknown config key 'server.prot'. Did you mean server.port?"),
                        ("server.max_queue=zero", "server.max_queue=zero must be a whole number"),
                        ("output.path=x.mp4", "output.path is set by the server")]:
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "serve.py"), arg], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
