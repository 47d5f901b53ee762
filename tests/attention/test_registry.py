"""The attention-backend registry: every backend is one complete object; a new sparse backend is one registration."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tessera.attention import (
    Backend,
    DenseAttention,
    backend_names,
    get_backend,
    register_backend,
    sparse_backends,
    unregister_backend,
)

CPU = torch.device("cpu")
# an example value for every attention-config key a backend takes (Backend.config_keys)
_EXAMPLE_OPTIONS = {"sla_topk": 0.5, "sla_block_q": 128, "sla_block_k": 64, "sla_feature_map": "softmax"}


@pytest.mark.parametrize("name", backend_names())
def test_every_backend_is_complete(name: str) -> None:
    backend = get_backend(name)
    assert backend.name == name and isinstance(backend.sparse, bool) and isinstance(backend.uses_gate, bool)
    for field in ("check_supported", "auto_problem", "token_order", "build"):
        assert callable(getattr(backend, field)), field
    assert backend.build_metadata is None or callable(backend.build_metadata)
    assert backend.check_supported(torch.float32, 32, CPU, (8, 8, 8)) is None  # all run on CPU, the spec
    options = {key: _EXAMPLE_OPTIONS[key] for key in backend.config_keys}
    meta = backend.build_metadata((8, 8, 8), 0.5, CPU, **options) if backend.build_metadata else None
    attn = backend.build(meta, torch.float32, 32)
    assert attn.uses_gate == backend.uses_gate and isinstance(attn.kernel, str)
    order = backend.token_order(meta)
    if order is not None:  # a permutation of the raster tokens and its inverse
        assert torch.equal(order[0][order[1]], torch.arange(8 * 8 * 8))


def test_the_shipped_backends() -> None:
    assert {"dense", "vsa", "sla"} <= set(backend_names())
    assert [b.name for b in sparse_backends()] == ["vsa", "sla"]  # registration order: auto asks VSA first
    assert "proj_l" in get_backend("sla").auto_problem(torch.device("cuda"))  # never picked by auto
    assert get_backend("vsa").check_supported(torch.float32, 32, CPU, (2, 8, 8)) is not None  # smaller than a tile
    assert "CUDA" in get_backend("vsa").auto_problem(CPU) and get_backend("dense").auto_problem(CPU) is None


def test_unknown_backend_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; registered: dense, vsa, sla"):
        get_backend("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_backend(get_backend("dense"))


def test_a_fake_sparse_backend_is_one_registration_and_the_plan_selects_it_per_block() -> None:
    from tessera.runtime import AttentionConfig, build_attention_plan

    fake = dataclasses.replace(get_backend("dense"), name="fake_sparse", sparse=True)
    register_backend(fake)
    try:
        plan = build_attention_plan(
            AttentionConfig(backend="fake_sparse", sparsity=0.5, dense_blocks=[1], dense_steps=1),
            num_layers=3, num_steps=2, grid_thw=(4, 8, 8), head_dim=32, dtype=torch.float32, device=CPU,
        )
        assert plan.blocks_per_step == (("dense",) * 3, ("fake_sparse", "dense", "fake_sparse"))
        assert plan.sparsity_per_step == (None, 0.5) and plan.uses_sparse
        assert [b.name for b in plan.backends_in_use] == ["dense", "fake_sparse"]
        # auto asks every sparse backend: vsa declines on CPU, the fake one accepts
        auto = build_attention_plan(AttentionConfig(backend="auto"), num_layers=3, num_steps=2, grid_thw=(4, 8, 8),
                                    head_dim=32, dtype=torch.float32, device=CPU)
        assert auto.backend == "fake_sparse" and "chose fake_sparse" in auto.reason
    finally:
        unregister_backend("fake_sparse")
    assert "fake_sparse" not in backend_names()


def test_dense_callable_is_the_sdpa_backend() -> None:
    assert isinstance(get_backend("dense").build(None, torch.float32, 32), DenseAttention)
    assert isinstance(get_backend("dense"), Backend)


def test_the_vsa_fine_kernel_is_chosen_once_and_reported() -> None:
    from tessera.attention import VSAAttention, build_vsa_metadata

    meta = build_vsa_metadata((4, 8, 8), 0.5, CPU)
    assert VSAAttention(meta).kernel == "torch"  # CPU: the reference
    assert VSAAttention(meta, impl="triton").kernel == "triton"  # interpreter: Gluon needs Hopper
    assert VSAAttention(meta, impl="triton", fine_kernel="triton").kernel == "triton"
    with pytest.raises(ValueError, match="fine_kernel='gluon' needs a Hopper GPU"):
        VSAAttention(meta, impl="triton", fine_kernel="gluon", dtype=torch.bfloat16, head_dim=128)
