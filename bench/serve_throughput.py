"""Video server throughput: requests per minute of 3-step and 50-step CFG VSA 0.9 requests at 480x832x81.

    python bench/serve_throughput.py --out bench_serve.json [--nproc 1] [--requests 4] [--dir /tmp/tessera_bench_wan13b]
    python bench/serve_throughput.py --smoke --out /tmp/serve_smoke.json     # tiny shapes on the CPU (checks the path)

Starts `launch/serve.py` (torchrun with --nproc ranks, `parallel.sp=nproc`) on bench/end_to_end.py's random
1.3B-sized diffusers checkpoint (written once into --dir), without the server's warm-up, then per regime (3 steps,
then 50 steps; guidance 5, VSA 0.9, UniPC): one request alone (the first also pays compile and autotune), a second
alone with a new prompt and seed (the warm path), then --requests posted at once (requests per minute, from the first
POST to the last completion). Each request: its latency (POST to `completed`) and the report's stage seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from end_to_end import PROMPT, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
REGIMES = (3, 50)  # denoising steps


def _call(url: str, method: str = "GET", body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def _run_requests(url: str, out_dir: Path, bodies: list[dict]) -> tuple[float, list[dict]]:
    """Post every body at once; (seconds from the first POST to the last completion, per-request results)."""
    t0 = time.perf_counter()
    posted = [(_call(f"{url}/v1/videos", "POST", body)["id"], time.perf_counter()) for body in bodies]
    results, pending = {}, dict(posted)
    while pending:
        for job_id, t_post in list(pending.items()):
            job = _call(f"{url}/v1/videos/{job_id}")
            if job["status"] in ("completed", "failed"):
                assert job["status"] == "completed", job
                report = json.loads((out_dir / f"{job_id}.json").read_text())
                results[job_id] = {"latency_seconds": time.perf_counter() - t_post,
                                   "stage_seconds": report["stage_seconds"]}
                del pending[job_id]
        time.sleep(0.05)
    return time.perf_counter() - t0, [results[job_id] for job_id, _ in posted]


def _start_server(args: argparse.Namespace, out_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str, int]:
    size = ["num_frames=13", "height=64", "width=64"] if args.smoke else ["num_frames=81", "height=480", "width=832"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(REPO / "launch" / "serve.py"), f"model.path={args.dir}", f"parallel.sp={args.nproc}",
           f"model.dtype={'float32' if args.smoke else 'bfloat16'}", "attention.backend=vsa", "attention.sparsity=0.9",
           "guidance_scale=5.0", *size, "server.port=0", f"server.output_dir={out_dir}", "server.warmup=false",
           f"server.max_queue={args.requests + 2}"]
    log = open(log_path, "wb")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 1800
    while not (found := re.search(r"serving on (http://[\d.]+:\d+)/v1/videos \(pid (\d+)\)", log_path.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    url = found[1]
    while True:
        try:
            _call(f"{url}/health")
            return proc, url, int(found[2])
        except OSError:  # 503 while loading (HTTPError is an OSError)
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", default="/tmp/tessera_bench_wan13b")
    parser.add_argument("--text-layers", type=int, default=24)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not (Path(args.dir) / "model_index.json").is_file():
        write_checkpoint(Path(args.dir), args.smoke, 2 if args.smoke else args.text_layers, device)
    out_dir = Path(args.out).with_suffix("")
    proc, url, rank0_pid = _start_server(args, out_dir, out_dir.parent / f"{out_dir.name}.server.log")
    result: dict = {"device": str(device), "nproc": args.nproc, "requests": args.requests, "regimes": {}}
    try:
        for steps in REGIMES if not args.smoke else (3, 5):
            body = {"prompt": PROMPT, "negative_prompt": "blurry low quality", "num_steps": steps}
            _, (first,) = _run_requests(url, out_dir, [{**body, "seed": 1}])
            _, (second,) = _run_requests(url, out_dir, [{**body, "seed": 2, "prompt": PROMPT + ", at dusk"}])
            seconds, batch = _run_requests(url, out_dir, [{**body, "seed": 10 + i} for i in range(args.requests)])
            result["regimes"][f"{steps}_steps"] = {
                "first": first, "second": second, "second_over_first": second["latency_seconds"]
                / first["latency_seconds"], "batch_seconds": seconds,
                "requests_per_minute": 60 * args.requests / seconds, "batch": batch}
            print(f"{steps} steps: first {first['latency_seconds']:.2f} s, second {second['latency_seconds']:.2f} s, "
                  f"{60 * args.requests / seconds:.2f} requests/min", flush=True)
    finally:
        os.kill(rank0_pid, signal.SIGTERM)  # drains; the launcher then exits 0
        proc.wait(timeout=120)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
