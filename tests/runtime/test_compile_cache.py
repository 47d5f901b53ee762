"""`model.cache_dir`: a second process compiling the same graph reads it from the cache (inductor's FX graph cache,
CPU codegen here; on CUDA the DiT's compiled stages and Triton kernels land in the same directory), and the report
says hit or miss."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tessera.launch.generate import main
from tessera.runtime.compile_cache import DeviceWarmup, compile_cache_counters, compile_cache_report

_COMPILE_ONCE = textwrap.dedent("""
    import json, sys, torch
    from tessera.runtime.compile_cache import compile_cache_counters, compile_cache_report, use_compile_cache
    root = use_compile_cache(sys.argv[1])
    before = compile_cache_counters()
    f = torch.compile(lambda x: torch.nn.functional.gelu(x * 2 + 1).sum(-1), dynamic=False)
    f(torch.randn(8, 16))
    print(json.dumps(compile_cache_report(root, before)))
""")


@pytest.mark.slow
def test_second_process_hits_the_cache(tmp_path):
    def run() -> dict:
        proc = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, str(tmp_path / "cache")], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold, warm = run(), run()
    assert cold["status"] == "miss" and cold["graph_misses"] >= 1
    assert warm["status"] == "hit" and warm["graph_hits"] >= 1 and warm["graph_misses"] == 0
    assert warm["dir"] == str(tmp_path / "cache") and (tmp_path / "cache" / "inductor").is_dir()


def test_report_verdicts():
    before = compile_cache_counters()
    assert compile_cache_report(None, before) == {"dir": None, "graph_hits": 0, "graph_misses": 0,
                                                  "compile_seconds": 0.0, "status": "none"}


def test_cli_report_names_the_cache(tmp_path):
    out = tmp_path / "v.mp4"
    assert main(["num_frames=5", "height=32", "width=32", "num_steps=1", f"output.path={out}",
                 f"model.cache_dir={tmp_path / 'c'}"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["compile_cache"]["dir"] == str(tmp_path / "c") and report["compile_cache"]["status"] == "none"
    warmup = report["compile_cache"]["device_warmup"]  # the libraries' start-up ran beside the load
    assert warmup["error"] is None and warmup["seconds"] >= 0


def test_device_warmup_keys_triton_once_in_the_background():
    """The thread leaves Triton's cache key computed for the process (every kernel's first launch reuses it)."""
    triton_key = pytest.importorskip("triton.runtime.cache").triton_key
    triton_key.cache_clear()
    warmup = DeviceWarmup(torch.device("cpu"), torch.float32).start()
    entry = warmup.join()
    assert entry["error"] is None and entry["seconds"] > 0
    assert triton_key.cache_info().currsize == 1


def test_device_warmup_failure_is_recorded_not_raised(monkeypatch):
    def broken(self):
        raise OSError("disk on fire")

    monkeypatch.setattr(DeviceWarmup, "_triton", broken)
    entry = DeviceWarmup(torch.device("cpu"), torch.float32).start().join()
    assert entry["error"] == "OSError: disk on fire" and entry["seconds"] is not None
