"""Property: the sequence-parallel DiT forward (Ulysses + dense attention over real gloo ranks) equals the
one-rank forward, for random token grids, rank counts 1..4, head counts 1..5 and token orders.

Hypothesis draws a batch of cases per example; each example is ONE spawned job of `world_size` ranks that
runs the whole batch (process start-up dominates), so a handful of examples stays within ~40 s.
"""

from __future__ import annotations

import gc

import pytest
import torch
from _dist import run_multirank
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tessera.attention import DenseAttention
from tessera.models.family import ForwardContext
from tessera.models.wan import WanConfig, build_wan_on_meta
from tessera.models.wan.transformer import set_parameter_
from tessera.parallel import SequenceShardPlan, UlyssesAttention, build_mesh

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

REL_TOL = 1e-5  # fp32; the README's cross-rank-count tolerance
HEAD_DIM = 8

# (T, Hh, Ww) token grid, heads, whether tokens run in a random (VSA-like) order, seed
CASES = st.tuples(
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
    st.integers(1, 5),
    st.booleans(),
    st.integers(0, 2**16),
)


def _model(num_heads: int, seed: int):
    config = WanConfig(num_attention_heads=num_heads, attention_head_dim=HEAD_DIM, ffn_dim=24, num_layers=2,
                       in_channels=4, out_channels=4, text_dim=12, freq_dim=16)
    model = build_wan_on_meta(config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        # O(1) weights: with tiny ones a mis-routed head or token would barely move the output.
        value = torch.randn(param.shape, generator=gen) / max(1, param.shape[-1]) ** 0.5
        set_parameter_(model, name, value + (1.0 if param.ndim == 1 and name.endswith("norm.weight") else 0.0))
    return model.eval()


def _job(rank: int, world_size: int, cases: list) -> list[float]:
    mesh = build_mesh(cfg=1, sp=world_size, device=torch.device("cpu"))
    errors = []
    for (t, h, w), num_heads, permuted, seed in cases:
        model = _model(num_heads, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(1, 4, t, 2 * h, 2 * w, generator=gen)
        timestep = torch.full((1,), 500.0)
        text = torch.randn(1, 3, 12, generator=gen)
        seq_plan = SequenceShardPlan(t * h * w, mesh.sp_size, mesh.sp_rank)
        order = torch.randperm(t * h * w, generator=gen) if permuted else None
        cos, sin = model.rope_tables((t, h, w), "cpu")
        if order is not None:
            cos, sin = cos[order], sin[order]
        attn = UlyssesAttention.from_mesh(DenseAttention(), mesh, seq_plan, num_heads)
        ctx = ForwardContext(
            rope=(seq_plan.shard(cos, dim=0), seq_plan.shard(sin, dim=0)),
            attn=[attn] * len(model.blocks),
            token_order=order,
            token_order_inverse=None if order is None else order.argsort(),
            shard=seq_plan.shard,
            gather=lambda y, plan=seq_plan: plan.gather(y, mesh.sp_group, dim=1),
        )
        with torch.no_grad():
            ref = model(x, timestep, text)  # one device, raster order
            out = model(x, timestep, text, ctx=ctx)
        errors.append(((out - ref).abs().max() / ref.abs().max()).item())
        del ctx, attn
    gc.collect()  # objects holding the process group must go before it is destroyed (else gloo may abort at exit)
    return errors


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world_size=st.integers(1, 4), cases=st.lists(CASES, min_size=1, max_size=3))
def test_sp_forward_equals_one_rank(world_size, cases):
    for rank, errors in enumerate(run_multirank(_job, world_size, cases, timeout_s=90.0)):
        assert max(errors) < REL_TOL, f"rank {rank} of {world_size}: relative errors {errors} for {cases}"
