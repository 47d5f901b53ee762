"""Residency of the VSA token order in a real request state: the DiT forward permutes tokens into tile order
once and back once, whatever its depth, and every linear layer runs on exactly the real tokens (no pad slots).

Counted with a TorchDispatchMode over one CPU forward; the attention calls themselves (which gather inside
the VSA reference) are left out, so what is counted is the model's own layout work between them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from tessera.attention import MetadataCache
from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_
from tessera.parallel import build_mesh
from tessera.runtime import AttentionConfig, build_attention_plan
from tessera.runtime.request import build_request_state
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that move tokens by an index (a reorder, gather or scatter)
_INDEX_OPS = {"index", "index_select", "gather", "scatter", "scatter_add", "take", "take_along_dim", "index_put",
              "_index_put_impl", "index_copy", "index_add"}
_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "linear"}


class _Recorder(TorchDispatchMode):
    """Counts index ops and the row counts of matmuls, except while ``paused`` (inside an attention call)."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.index_ops: Counter = Counter()
        self.matmul_rows: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        if not self.paused:
            if name in _INDEX_OPS:
                self.index_ops[name] += 1
            elif name in _MATMUL_OPS:
                operand = args[1] if name in ("addmm", "baddbmm") else args[0]
                self.matmul_rows[operand.shape[-2]] += 1
        return func(*args, **(kwargs or {}))


class _Paused:
    """An attention callable whose own ops the recorder skips."""

    def __init__(self, inner, recorder: _Recorder) -> None:
        self.inner, self.recorder, self.uses_gate = inner, recorder, inner.uses_gate

    def __call__(self, *args):
        self.recorder.paused = True
        try:
            return self.inner(*args)
        finally:
            self.recorder.paused = False


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("backend", ["vsa", "dense"])
def test_forward_reorders_tokens_once_and_never_computes_on_pads(backend: str, num_layers: int) -> None:
    config = WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                       out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=num_layers,
                       gate_compress=backend == "vsa")
    model = materialize_random_(build_wan_on_meta(config), 0, "cpu", torch.float32).eval()
    grid = (5, 6, 7)  # partial tiles on every axis: 210 real tokens in 8 tiles of 64 slots
    cpu = torch.device("cpu")
    plan = build_attention_plan(AttentionConfig(backend=backend, sparsity=0.5), num_layers=num_layers,
                                num_steps=1, grid_thw=grid, head_dim=16, dtype=torch.float32, device=cpu)
    state = build_request_state(model, plan, grid, build_mesh(cfg=1, sp=1, device=cpu), MetadataCache())
    assert state.kernels == ({"vsa": "torch"} if backend == "vsa" else {"dense": "sdpa"})  # reported per backend
    recorder = _Recorder()
    ctx = state.context_for_step(0)
    ctx = dataclasses.replace(ctx, attn=tuple(_Paused(attn, recorder) for attn in ctx.attn))
    batch, text_len = 2, 7
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, grid[0], 2 * grid[1], 2 * grid[2], generator=gen)
    text = torch.randn(batch, text_len, 24, generator=gen)
    with torch.no_grad(), recorder:
        out = model(latents, torch.tensor([900.0, 100.0]), text, ctx=ctx)
    assert out.shape == latents.shape and torch.isfinite(out).all()

    tokens = grid[0] * grid[1] * grid[2]
    # tile order in, raster order out: two indexings per forward under VSA, none for dense, none per layer
    assert dict(recorder.index_ops) == ({"index": 2} if backend == "vsa" else {}), recorder.index_ops
    # every projection of the video tokens sees B * 210 rows (never the 512 padded slots); the others are
    # the text tokens and the per-sample timestep / modulation rows
    assert set(recorder.matmul_rows) <= {batch * tokens, batch * text_len, batch}, recorder.matmul_rows
    per_layer = 4 + 2 + 2 + (backend == "vsa")  # self-attention q k v out; cross q out; FFN up down; gate
    assert recorder.matmul_rows[batch * tokens] == num_layers * per_layer + 1, recorder.matmul_rows  # + proj_out
