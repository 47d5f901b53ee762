"""DenseAttention against an explicit fp32 softmax-attention reference."""

import math

import pytest
import torch
from tessera.attention import AttentionBackend, DenseAttention


def _slow_attention(q, k, v):
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores, dim=-1) @ v.double()).float()


@pytest.mark.parametrize("shape", [(2, 3, 37, 24), (1, 5, 64, 16), (3, 1, 1, 8)])
def test_dense_matches_explicit_softmax(shape):
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    out = DenseAttention()(q, k, v, None)
    ref = _slow_attention(q, k, v)
    assert out.shape == shape and out.dtype == torch.float32
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_dense_bf16_keeps_dtype_and_is_close():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 45, 32, generator=g) for _ in range(3))
    out = DenseAttention()(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert out.dtype == torch.bfloat16
    ref = _slow_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    assert (out.float() - ref).abs().max() / ref.abs().max() < 2e-2


def test_dense_is_a_backend_without_gate():
    backend = DenseAttention()
    assert isinstance(backend, AttentionBackend)
    assert backend.name == "dense" and backend.uses_gate is False
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="gate"):
        backend(x, x, x, torch.ones_like(x))
