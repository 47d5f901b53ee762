"""The fused q/k RMSNorm + RoPE Triton kernel against the torch composite (the spec).

CPU checks run the kernel under TRITON_INTERPRET=1 in a subprocess (this file run as a script): another test
module may already have imported triton in this pytest process without the interpreter.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch


def _inputs(batch: int, seq_len: int, heads: int, head_dim: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seq_len)
    q, k = (torch.randn(batch, seq_len, heads * head_dim, generator=gen) * 3 for _ in range(2))
    w_q, w_k = (1 + 0.3 * torch.randn(heads * head_dim, generator=gen) for _ in range(2))
    angle = torch.rand(seq_len, head_dim // 2, generator=gen, dtype=torch.float64) * 40
    cos, sin = angle.cos().float(), angle.sin().float()  # fp32 tables, as the model builds them
    cast = [t.to(device=device, dtype=dtype) for t in (q, k, w_q, w_k)]
    return (*cast, 1e-6, cos.to(device), sin.to(device), heads)


def _check(dtype: torch.dtype, device: str = "cpu") -> None:
    from tessera.models.wan.qk_norm_rope import qk_norm_rope

    # widths whose pair count is not a power of two; several tokens per table row (batch 2)
    for batch, seq_len, heads, head_dim in ((2, 37, 3, 16), (1, 5, 12, 128)):
        args = _inputs(batch, seq_len, heads, head_dim, dtype, device)
        got = qk_norm_rope(*args, fused=True)
        expected = qk_norm_rope(*args, fused=False)
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape == (batch, seq_len, heads, head_dim) and g.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            else:  # roundings may land one ulp apart; the CPU interpreter truncates fp32 -> bf16 (often apart)
                torch.testing.assert_close(g.float(), e.float(), rtol=2**-6, atol=2**-6)
                if device == "cuda":
                    assert (g != e).float().mean() < 0.05
    # the kernel really normalises and rotates: a different table changes the result
    args = list(_inputs(1, 5, 2, 16, dtype, device))
    base = qk_norm_rope(*args, fused=True)[0]
    args[5] = args[5].roll(1, 0)
    assert not torch.equal(qk_norm_rope(*args, fused=True)[0], base)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_interpreted_kernel_matches_composite(run_triton_interpreted, dtype_name: str) -> None:
    proc = run_triton_interpreted(__file__, dtype_name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fake_impl_shapes() -> None:
    from tessera.models.wan.qk_norm_rope import qk_norm_rope
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 7, 48, dtype=torch.bfloat16)
        w = torch.empty(48, dtype=torch.bfloat16)
        table = torch.empty(7, 8)
        out_q, out_k = qk_norm_rope(q, q, w, w, 1e-6, table, table, 3, fused=True)
    assert out_q.shape == out_k.shape == (2, 7, 3, 16) and out_q.dtype == torch.bfloat16


@pytest.mark.gpu
def test_gpu_kernel_matches_composite_bf16() -> None:
    _check(torch.bfloat16, "cuda")
    _check(torch.float32, "cuda")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _check(getattr(torch, sys.argv[1]))
    print("ok")
