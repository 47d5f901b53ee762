"""CUDA-graph replay of the DiT forward (runtime/graphs.py): when it is on, and on a GPU, that replays equal the
eager forward for every step plan and fresh inputs, and that a failing capture falls back to eager."""

from __future__ import annotations

import pytest
import torch
from tessera.attention import MetadataCache
from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_
from tessera.parallel import build_mesh
from tessera.runtime import AttentionConfig, build_attention_plan
from tessera.runtime.graphs import GraphedForward, host_bound, resolve_cuda_graphs
from tessera.runtime.request import build_request_state


@pytest.mark.parametrize(("setting", "device", "world", "expected"), [
    ("auto", "cpu", 1, "never"), ("true", "cpu", 1, "never"), ("auto", "cuda", 1, "adaptive"),
    ("auto", "cuda", 2, "never"), ("True", "cuda", 4, "always"), ("False", "cuda", 1, "never"),
    ("false", "cuda", 1, "never"),
])
def test_resolve_cuda_graphs(setting, device, world, expected):
    assert resolve_cuda_graphs(setting, torch.device(device), world) == expected


def test_host_bound_compares_issue_time_with_the_span():
    assert host_bound(0.097, 0.099)  # sp 8 eager: the GPU waits for the launches
    assert not host_bound(0.09, 0.44)  # 1.3B at one rank: the GPU sets the pace


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
    state = build_request_state(model, plan, grid, build_mesh(cfg=1, sp=1, device=device), MetadataCache())
    return model, state, grid


@pytest.mark.gpu
def test_gpu_replays_equal_the_eager_forward():
    device = torch.device("cuda")
    model, state, grid = _request(device)
    model.use_fast_stages(compile=True)
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
    order = state.context_for_step(1).token_order  # VSA's: a pinned host table, copied in by each replay
    assert order.device.type == "cpu" and order.is_pinned()


@pytest.mark.gpu
@pytest.mark.parametrize("bound", ["host", "gpu"])
def test_gpu_adaptive_captures_only_host_bound_plans(bound, monkeypatch):
    """auto: two eager calls per plan (compile, then timed), then a capture only if the timed call was
    host-bound; every output equals the eager forward either way."""
    import tessera.runtime.graphs as graphs

    monkeypatch.setattr(graphs, "host_bound", lambda host, span: bound == "host")
    device = torch.device("cuda")
    model, state, grid = _request(device)
    forward = GraphedForward(model, enabled=True, adaptive=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    text = torch.randn(2, 7, 24, device=device, generator=gen, dtype=torch.bfloat16)
    ctx = state.context_for_step(1)
    with torch.inference_mode():
        for call in range(4):
            latents = torch.randn(2, 4, grid[0], 2 * grid[1], 2 * grid[2], device=device, generator=gen,
                                  dtype=torch.bfloat16)
            timestep = torch.tensor([700.0, 10.0 * call], device=device)
            got = forward(latents, timestep, text, ctx=ctx)
            assert torch.equal(got, model(latents, timestep, text, ctx=ctx)), call
            assert len(forward.graphs) == (1 if bound == "host" and call >= 2 else 0), call
    (probe,) = forward.report()["probes"]
    assert probe["host_bound"] == (bound == "host") and probe["span_s"] > 0 and probe["host_s"] > 0


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
