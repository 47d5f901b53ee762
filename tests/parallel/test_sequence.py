"""Single-process tests: split sizes, shard plans, world-1 mesh, env init, Ulysses at sp=1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tessera.parallel import (
    SequenceShardPlan,
    UlyssesAttention,
    build_mesh,
    destroy_process_group_safely,
    init_process_group_from_env,
    split_sizes,
    warmup_collectives,
)


@pytest.mark.parametrize(
    ("total", "parts", "expected"),
    [(37, 4, [10, 9, 9, 9]), (36, 4, [9, 9, 9, 9]), (2, 3, [1, 1, 0]), (12, 8, [2, 2, 2, 2, 1, 1, 1, 1]),
     (0, 2, [0, 0]), (5, 1, [5])],
)
def test_split_sizes(total: int, parts: int, expected: list[int]) -> None:
    assert split_sizes(total, parts) == expected


def test_split_sizes_rejects_bad_parts() -> None:
    with pytest.raises(ValueError, match="parts"):
        split_sizes(4, 0)


@pytest.mark.parametrize(("seq_len", "sp_size"), [(37, 4), (36, 3), (3, 4), (1, 1)])
def test_shard_plan_covers_sequence_in_order(seq_len: int, sp_size: int) -> None:
    x = torch.randn(2, seq_len, 5)
    plans = [SequenceShardPlan(seq_len, sp_size, rank) for rank in range(sp_size)]
    assert max(p.local_size for p in plans) - min(p.local_size for p in plans) <= 1
    assert plans[0].offsets[-1] == seq_len and plans[0].sizes == tuple(split_sizes(seq_len, sp_size))
    shards = [plan.shard(x) for plan in plans]
    assert all(s.data_ptr() == x[:, p.local_slice].data_ptr() for s, p in zip(shards, plans, strict=True))
    assert torch.equal(torch.cat(shards, dim=1), x)
    assert torch.equal(plans[-1].shard(x.transpose(0, 1), dim=0), x.transpose(0, 1)[plans[-1].local_slice])


def test_shard_plan_validates() -> None:
    with pytest.raises(ValueError, match="sp_rank"):
        SequenceShardPlan(10, 2, 2)
    with pytest.raises(ValueError, match="parallel.sp"):
        SequenceShardPlan(10, 0, 0)


def test_world1_shard_and_gather_are_identity() -> None:
    plan = SequenceShardPlan(37, 1, 0)
    x = torch.randn(1, 37, 4)
    assert plan.shard(x) is x
    assert plan.gather(x, None) is x


def test_world1_mesh_without_process_group() -> None:
    mesh = build_mesh(cfg=1, sp=1, device=torch.device("cpu"))
    assert (mesh.world_size, mesh.rank, mesh.sp_size, mesh.cfg_size) == (1, 0, 1, 1)
    assert mesh.sp_group is None and mesh.cfg_group is None and mesh.is_main
    warmup_collectives(mesh)  # no-op at world 1
    destroy_process_group_safely()  # no-op without a process group


def test_mesh_size_mismatch_names_keys_and_fix() -> None:
    with pytest.raises(ValueError, match=r"parallel\.cfg.*parallel\.sp.*world size is 1.*Fix"):
        build_mesh(cfg=1, sp=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="parallel.sp"):
        build_mesh(cfg=1, sp=0, device=torch.device("cpu"))


def test_init_from_env_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert init_process_group_from_env(timeout_s=10.0, device_type="cpu") == (0, 1, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="timeout"):
        init_process_group_from_env(timeout_s=0.0)


class _GatedSDPA:
    name = "gated_sdpa"
    uses_gate = True

    def __call__(self, q_BNSD, k_BNSD, v_BNSD, gate_BNSD):
        return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD) + gate_BNSD * v_BNSD


def test_ulysses_sp1_is_plain_attention() -> None:
    q, k, v, gate = torch.randn(4, 2, 11, 3, 8).unbind(0)
    plan = SequenceShardPlan(11, 1, 0)
    attn = UlyssesAttention(_GatedSDPA(), None, 1, 0, plan, num_heads=3)
    assert attn.uses_gate and attn.num_local_heads == 3
    out = attn(q, k, v, gate)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ref = t(F.scaled_dot_product_attention(t(q), t(k), t(v)) + t(gate) * t(v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_ulysses_rejects_mismatched_plan() -> None:
    with pytest.raises(ValueError, match="seq_plan"):
        UlyssesAttention(_GatedSDPA(), None, 1, 0, SequenceShardPlan(11, 2, 0), num_heads=3)
