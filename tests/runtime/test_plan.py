"""The per-block, per-step attention plan: backend resolution, dense blocks/steps, schedules, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from tessera.runtime import AttentionConfig, build_attention_plan

CPU = torch.device("cpu")


def plan_for(grid=(5, 8, 8), num_layers=4, num_steps=3, dtype=torch.float32, **att):
    return build_attention_plan(
        AttentionConfig(**att), num_layers=num_layers, num_steps=num_steps, grid_thw=grid,
        head_dim=32, dtype=dtype, device=CPU,
    )


def test_dense_backend_is_dense_everywhere():
    plan = plan_for(backend="dense")
    assert plan.backend == "dense" and not plan.uses_sparse
    assert plan.blocks_per_step == (("dense",) * 4,) * 3
    assert plan.sparsity_per_step == (None, None, None)


def test_vsa_with_dense_blocks_and_steps_and_schedule():
    plan = plan_for(backend="vsa", sparsity=[0.5, 0.8, 0.9], dense_blocks=[0, 3], dense_steps=1)
    assert plan.backend == "vsa" and plan.uses_sparse
    assert plan.blocks_per_step[0] == ("dense",) * 4
    assert plan.blocks_per_step[1] == plan.blocks_per_step[2] == ("dense", "vsa", "vsa", "dense")
    assert plan.sparsity_per_step == (None, 0.8, 0.9)
    assert plan.step_key(1) != plan.step_key(2)  # different sparsity -> different metadata


def test_auto_explains_why_it_chose_dense():
    on_cpu = plan_for(backend="auto")
    assert on_cpu.backend == "dense" and "CUDA" in on_cpu.reason  # the CPU path is the O(S^2) reference
    small = plan_for(backend="auto", grid=(2, 8, 8))
    assert small.backend == "dense" and "tile" in small.reason
    all_dense = plan_for(backend="auto", dense_blocks=[0, 1, 2, 3])
    assert all_dense.backend == "dense" and "dense_blocks" in all_dense.reason


def test_auto_prefers_vsa_on_a_gpu():
    plan = build_attention_plan(
        AttentionConfig(backend="auto"), num_layers=4, num_steps=2, grid_thw=(5, 8, 8), head_dim=128,
        dtype=torch.bfloat16, device=torch.device("cuda"),
    )
    # The plan only reads the device type (no GPU needed to build it); triton is a test dependency.
    assert plan.backend == "vsa" and plan.uses_sparse and plan.blocks_per_step[0] == ("vsa",) * 4


@pytest.mark.parametrize(
    ("att", "grid", "needle"),
    [
        ({"backend": "vsa"}, (3, 8, 8), "tile"),
        ({"backend": "vsa", "dense_blocks": [4]}, (5, 8, 8), "attention.dense_blocks"),
        ({"backend": "dense", "dense_blocks": [-1]}, (5, 8, 8), "attention.dense_blocks"),
        ({"backend": "vsa", "sparsity": [0.5, 0.5]}, (5, 8, 8), "attention.sparsity"),
    ],
)
def test_plan_errors_name_the_key(att, grid, needle):
    with pytest.raises(ValueError, match=needle):
        plan_for(grid=grid, **att)


def test_vsa_with_every_step_dense_warns_and_says_why():
    with pytest.warns(UserWarning) as record:
        plan = plan_for(backend="vsa", dense_steps=3, num_steps=3)
    assert len(record) == 1
    for text in (str(record[0].message), plan.reason):
        assert "whole run is dense" in text and "attention.dense_steps=3 >= num_steps=3" in text
    assert plan.backend == "dense" and not plan.uses_sparse
    assert plan.blocks_per_step == (("dense",) * 4,) * 3 and plan.sparsity_per_step == (None,) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one sparse step left: no warning
        plan = plan_for(backend="vsa", dense_steps=2, num_steps=3)
    assert plan.backend == "vsa" and plan.uses_sparse and "dense_steps" not in plan.reason
