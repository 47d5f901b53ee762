"""Launch real `torchrun ... launch/generate.py` jobs with an injected fault and inspect what the user sees.

`start_job` returns a `Job` (the launcher started in its own session, like a terminal's foreground job);
`Job.wait` gives (exit code, stderr, seconds). `leftovers` and `processes_mentioning` check that a failed
job left no output or temp file and no process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
TINY = ["num_frames=13", "height=64", "width=64", "num_steps=3", "seed=0"]
JOB_TIMEOUT_S = 120.0


@dataclass
class Job:
    proc: subprocess.Popen
    stderr_path: Path
    started: float

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace").replace("\r", "\n")

    def wait_for(self, needle: str, timeout_s: float = 60.0) -> None:
        """Poll stderr until `needle` shows up (e.g. the marker of a `sleep@` fault)."""
        deadline = time.monotonic() + timeout_s
        while needle not in self.stderr():
            assert self.proc.poll() is None, f"job exited before printing {needle!r}:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} after {timeout_s} s:\n{self.stderr()[-3000:]}"
            time.sleep(0.1)

    def signal_launcher(self, sig: int) -> float:
        """Send `sig` to the launcher's process group (what Ctrl-C in a terminal does); returns the time."""
        os.killpg(self.proc.pid, sig)
        return time.monotonic()

    def wait(self, since: float | None = None) -> tuple[int, str, float]:
        """(exit code, stderr with carriage returns as newlines, seconds since start or `since`)."""
        try:
            code = self.proc.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"job still running after {JOB_TIMEOUT_S} s:\n{self.stderr()[-3000:]}") from None
        return code, self.stderr(), time.monotonic() - (self.started if since is None else since)


def start_job(tmp_path: Path, *overrides: str, fault: str = "", nproc: int = 2, name: str = "video") -> Job:
    """Start `torchrun --nproc_per_node=nproc` (nproc=0: plain python) writing into tmp_path/out/."""
    out = tmp_path / "out" / f"{name}.mp4"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    sp = [f"parallel.sp={nproc}"] if nproc else []
    cmd = [sys.executable, *launcher, str(REPO / "launch" / "generate.py"), *TINY, *sp,
           "parallel.timeout_s=20", f"output.path={out}", *overrides]
    env = {**os.environ, "TESSERA_FAULT": fault, "OMP_NUM_THREADS": "1"}
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    return Job(proc, stderr_path, time.monotonic())


def run_job(tmp_path: Path, *overrides: str, fault: str = "", nproc: int = 2) -> tuple[int, str, float]:
    return start_job(tmp_path, *overrides, fault=fault, nproc=nproc).wait()


def leftovers(tmp_path: Path) -> list[str]:
    """Files in the output directory (outputs, reports, latents, `.<stem>.tmp-*` temp files)."""
    out_dir = tmp_path / "out"
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


def processes_mentioning(needle: str, settle_s: float = 10.0) -> list[str]:
    """Command lines of live processes mentioning `needle` (the job's unique tmp path), after `settle_s`."""
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
                if needle in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
                    found.append(f"{proc.pid}: {cmdline}")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
