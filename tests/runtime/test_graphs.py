"""CUDA-graph replay of the DiT forward (runtime/graphs.py): when it is on, and on a GPU, that replays equal the
eager forward for every step plan and fresh inputs, and that a failing capture falls back to eager."""

from __future__ import annotations

import pytest
import torch

from attention import VSAMetadataCache
from models import WanConfig, build_wan_on_meta, materialize_random_
from parallel import build_mesh
from runtime import AttentionConfig, build_attention_plan
from runtime.graphs import GraphedForward, resolve_cuda_graphs
from runtime.request import build_request_state


@pytest.mark.parametrize(("setting", "device", "world", "expected"), [
    ("auto", "cpu", 1, False), ("true", "cpu", 1, False), ("auto", "cuda", 1, True), ("auto", "cuda", 2, False),
    ("True", "cuda", 4, True), ("False", "cuda", 1, False), ("false", "cuda", 1, False),
])
def test_resolve_cuda_graphs(setting, device, world, expected):
    assert resolve_cuda_graphs(setting, torch.device(device), world) is expected


def test_disabled_is_the_plain_forward():
    calls = []

    def model(*args, ctx):
        calls.append(ctx)
        return args[0] * 2

    forward = GraphedForward(model, enabled=False)
    x = torch.randn(3)
    assert torch.equal(forward(x, x, x, ctx="c"), x * 2) and calls == ["c"] and forward.graphs == {}


def _request(device, num_steps=3):
    config = WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4,
                       out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, gate_compress=True)
    model = materialize_random_(build_wan_on_meta(config), 0, device, torch.bfloat16).eval()
    grid = (5, 8, 9)
    # step 0 dense, steps 1-2 VSA at two sparsities: three step plans, three graphs
    plan = build_attention_plan(AttentionConfig(backend="vsa", sparsity=[0.5, 0.5, 0.7], dense_steps=1),
                                num_layers=2, num_steps=num_steps, grid_thw=grid, head_dim=128,
                                dtype=torch.bfloat16, device=device)
    state = build_request_state(model, plan, grid, build_mesh(cfg=1, sp=1, device=device), VSAMetadataCache())
    return model, state, grid


@pytest.mark.gpu
def test_gpu_replays_equal_the_eager_forward():
    device = torch.device("cuda")
    model, state, grid = _request(device)
    model.compile_blocks()
    forward = GraphedForward(model, enabled=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    text = torch.randn(2, 7, 24, device=device, generator=gen, dtype=torch.bfloat16)
    with torch.inference_mode():
        for rep in range(2):  # the first pass captures (and returns its warm-up), the second replays
            for step in range(3):
                ctx = state.context_for_step(step)
                latents = torch.randn(2, 4, grid[0], 2 * grid[1], 2 * grid[2], device=device, generator=gen,
                                      dtype=torch.bfloat16)
                timestep = torch.tensor([900.0 - 100 * step, 50.0 * rep], device=device)
                got = forward(latents, timestep, text, ctx=ctx)
                expected = model(latents, timestep, text, ctx=ctx)
                assert got.data_ptr() not in {entry[2].data_ptr() for entry in forward.graphs.values()}
                assert torch.equal(got, expected), (rep, step, (got.float() - expected.float()).abs().max())
    assert forward.enabled and forward.disabled_because is None and len(forward.graphs) == 3


@pytest.mark.gpu
def test_gpu_failed_capture_warns_and_runs_eagerly():
    device = torch.device("cuda")
    model, state, grid = _request(device)

    def syncing_model(*args, ctx):  # .item() syncs: not capturable
        out = model(*args, ctx=ctx)
        return out * (out.float().abs().max().item() > -1)

    forward = GraphedForward(syncing_model, enabled=True)
    latents = torch.randn(2, 4, grid[0], 2 * grid[1], 2 * grid[2], device=device, dtype=torch.bfloat16)
    args = (latents, torch.tensor([900.0, 900.0], device=device), torch.randn(2, 7, 24, device=device,
                                                                              dtype=torch.bfloat16))
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="model.cuda_graphs"):
            first = forward(*args, ctx=state.context_for_step(1))
        second = forward(*args, ctx=state.context_for_step(1))
    assert not forward.enabled and forward.disabled_because and forward.graphs == {}
    assert torch.equal(first, second)
