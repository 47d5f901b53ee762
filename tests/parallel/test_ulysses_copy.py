"""Ulysses' packing copies move 8-byte words where the rows allow: equal to a plain ``copy_`` on fresh random
permuted views (16-bit, fp32, misaligned rows and offsets, a dtype change), and the word path is really taken."""

from __future__ import annotations

import pytest
import torch
from tessera.parallel.ulysses import _as_words, _copy_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("D", [128, 12, 3])
def test_copy_rows_equals_copy_on_permuted_views(dtype: torch.dtype, D: int) -> None:
    gen = torch.Generator().manual_seed(D)
    x = torch.randn(2, 7, 6, D, generator=gen).to(dtype)  # [B, S, N, D]
    src = x.unflatten(2, (3, 2)).permute(2, 0, 1, 3, 4)  # [sp, B, S, n, D], as _pack_by_heads reads it
    expected = torch.empty(src.shape, dtype=dtype).copy_(src)
    got = torch.full(src.shape, float("nan"), dtype=dtype)
    _copy_rows(got, src)
    assert torch.equal(got, expected)
    words = (D * x.element_size()) % 8 == 0 and x.element_size() < 8
    assert (_as_words(src) is not None) == words and (_as_words(got) is not None) == words


def test_copy_rows_falls_back_on_misaligned_offsets_and_converts_dtypes() -> None:
    x = torch.randn(5, 9, 8).bfloat16()
    shifted = torch.randn(5 * 9 * 8 + 1).bfloat16()[1:].view(5, 9, 8)  # offset of one element: not word-aligned
    assert _as_words(shifted) is None
    got = torch.empty(5, 9, 8, dtype=torch.bfloat16)
    _copy_rows(got, shifted)
    assert torch.equal(got, shifted)
    to_fp32 = torch.empty(5, 9, 8)  # a dtype change copies values, never bytes
    _copy_rows(to_fp32, x)
    assert torch.equal(to_fp32, x.float())
