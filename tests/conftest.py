"""Shared test set-up: GPU tests skipped without CUDA, a Triton-interpreter runner (`tessera` is pip-installed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def run_triton_interpreted():
    """``run(*args)``: ``python *args`` in a fresh process with TRITON_INTERPRET=1.

    A fresh process, because another test module may already have imported triton in this one without the
    interpreter. Returns the CompletedProcess (text output captured).
    """

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)

    return run
