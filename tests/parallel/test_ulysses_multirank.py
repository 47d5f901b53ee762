"""Multi-rank tests on real gloo processes: Ulysses attention, uneven gathers and the (cfg x sp) mesh.

One spawned job per world size (2, 3, 4) runs every check and returns the errors; the parent asserts.
Every case compares against single-process SDPA on the full sequence (fp32, relative 1e-5).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import MultirankError, run_multirank
from tessera.parallel import SequenceShardPlan, UlyssesAttention, build_mesh, warmup_collectives

pytestmark = pytest.mark.multirank

REL_TOL = 1e-5

# (B, S, N, D, gated, strided inputs). S=37 is prime (uneven shards on 2/3/4 ranks), S=36 is even on all;
# N=12 is even on all, N=6 uneven on 4, N=3 uneven on 2/4, N=2 leaves ranks with zero heads on 3/4.
CASES = [
    (2, 37, 6, 8, True, True),
    (1, 37, 3, 8, False, False),
    (2, 36, 12, 8, True, False),
    (1, 36, 6, 8, False, True),
    (1, 37, 2, 8, True, False),
    (1, 3, 4, 8, True, False),  # fewer tokens than ranks at world 4: a rank with an empty shard
]


class _SDPA:
    name = "sdpa"
    uses_gate = False

    def __call__(self, q_BNSD, k_BNSD, v_BNSD, gate_BNSD=None):
        assert gate_BNSD is None
        return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD)


class _GatedSDPA:
    """SDPA + gate * q: a gate routed to the wrong heads or tokens (or misaligned with q) changes it."""

    name = "gated_sdpa"
    uses_gate = True

    def __call__(self, q_BNSD, k_BNSD, v_BNSD, gate_BNSD):
        return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD) + gate_BNSD * q_BNSD


class _GatedSDPAWritesOut(_GatedSDPA):
    """The same, through the ``writes_out`` protocol: Ulysses hands it the return send buffer (strided)."""

    writes_out = True

    def __call__(self, q_BNSD, k_BNSD, v_BNSD, gate_BNSD, out_BNSD=None):
        result = super().__call__(q_BNSD, k_BNSD, v_BNSD, gate_BNSD)
        if out_BNSD is None:  # the single-process reference
            return result
        assert out_BNSD.shape == q_BNSD.shape
        return out_BNSD.copy_(result)


def _inputs(seed: int, B: int, S: int, N: int, D: int, strided: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    if strided:  # q, k, v, gate as views into one [B, S, N, 4, D] tensor, like a fused projection
        qkvg = torch.randn(B, S, N, 4, D, generator=gen)
        return tuple(qkvg[:, :, :, i] for i in range(4))
    return tuple(torch.randn(B, S, N, D, generator=gen) for _ in range(4))


def _reference(backend, q_BSND, k_BSND, v_BSND, gate_BSND) -> torch.Tensor:
    gate_BNSD = gate_BSND.transpose(1, 2) if backend.uses_gate else None
    out_BNSD = backend(q_BSND.transpose(1, 2), k_BSND.transpose(1, 2), v_BSND.transpose(1, 2), gate_BNSD)
    return out_BNSD.transpose(1, 2)


# every torch.distributed collective and point-to-point call Ulysses could reach for
_COMM_CALLS = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_reduce",
               "reduce_scatter", "reduce_scatter_tensor", "broadcast", "scatter", "gather", "send", "recv",
               "isend", "irecv", "batch_isend_irecv")


@contextlib.contextmanager
def _count_comm():
    """Counts the torch.distributed calls made inside; yields (Counter of names, send sizes of all_to_all_single)."""
    counts, a2a_send_numel = Counter(), []
    originals = {name: getattr(dist, name) for name in _COMM_CALLS if hasattr(dist, name)}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            if name == "all_to_all_single":
                a2a_send_numel.append(args[1].numel())  # (output, input, ...)
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield counts, a2a_send_numel
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0


def _check_ulysses(mesh, seed_offset: int) -> dict[str, float]:
    """Run every case on mesh's SP axis; return {case: max relative error} (ulysses and gather)."""
    errors: dict[str, float] = {}
    for case_index, (B, S, N, D, gated, strided) in enumerate(CASES):
        backend = (_GatedSDPAWritesOut() if case_index in (0, 5) else _GatedSDPA()) if gated else _SDPA()
        plan = SequenceShardPlan(S, mesh.sp_size, mesh.sp_rank)
        attn = UlyssesAttention.from_mesh(backend, mesh, plan, N)
        q, k, v, gate = _inputs(1000 * seed_offset + case_index, B, S, N, D, strided)
        ref = _reference(backend, q, k, v, gate)

        with _count_comm() as (counts, a2a_send_numel):
            local_out = attn(plan.shard(q), plan.shard(k), plan.shard(v), plan.shard(gate))
        # ONE all-to-all carries q, k, v (and the gate) to head shards, ONE brings the output back; nothing else
        assert dict(counts) == {"all_to_all_single": 2}, dict(counts)
        per_token_head = (4 if gated else 3) * B * D
        expected = [per_token_head * plan.local_size * N, B * S * attn.num_local_heads * D]
        assert a2a_send_numel == expected, (a2a_send_numel, expected, attn)
        assert local_out.shape == (B, plan.local_size, N, D), local_out.shape
        name = f"B{B}_S{S}_N{N}_D{D}_gated{gated}_strided{strided}"
        errors[f"ulysses/{name}"] = _rel_err(local_out, plan.shard(ref))

        full_out = plan.gather(local_out, mesh.sp_group)  # uneven all-gather along dim 1
        errors[f"gather_dim1/{name}"] = _rel_err(full_out, ref)
        full_out_SBND = plan.gather(plan.shard(ref.transpose(0, 1), dim=0), mesh.sp_group, dim=0)
        errors[f"gather_dim0/{name}"] = _rel_err(full_out_SBND, ref.transpose(0, 1))
    return errors


def _job(rank: int, world_size: int) -> dict[str, float]:
    mesh = build_mesh(cfg=1, sp=world_size, device=torch.device("cpu"))
    assert (mesh.sp_rank, mesh.cfg_rank, mesh.cfg_group) == (rank, 0, None)
    warmup_collectives(mesh)
    errors = _check_ulysses(mesh, seed_offset=0)
    if world_size == 4:
        errors.update(_check_cfg2_sp2_mesh(rank))
    return errors


def _check_cfg2_sp2_mesh(rank: int) -> dict[str, float]:
    mesh = build_mesh(cfg=2, sp=2, device=torch.device("cpu"))
    assert (mesh.cfg_rank, mesh.sp_rank) == divmod(rank, 2), mesh
    assert mesh.sp_group is not None and mesh.cfg_group is not None
    warmup_collectives(mesh)
    sp_sum = torch.tensor([float(rank)])
    dist.all_reduce(sp_sum, group=mesh.sp_group)  # ranks {2c, 2c + 1}
    cfg_sum = torch.tensor([float(rank)])
    dist.all_reduce(cfg_sum, group=mesh.cfg_group)  # ranks {s, s + 2}
    assert sp_sum.item() == 4 * mesh.cfg_rank + 1, (rank, sp_sum)
    assert cfg_sum.item() == 2 * mesh.sp_rank + 2, (rank, cfg_sum)
    # Each CFG half runs its own Ulysses on different data: groups that mixed halves would show.
    errors = _check_ulysses(mesh, seed_offset=1 + mesh.cfg_rank)
    return {f"cfg2sp2/{key}": value for key, value in errors.items()}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ulysses_gather_and_mesh_match_single_process(world_size: int) -> None:
    results = run_multirank(_job, world_size)
    for rank, errors in enumerate(results):
        assert len(errors) == 3 * len(CASES) * (2 if world_size == 4 else 1)
        bad = {key: err for key, err in errors.items() if not err <= REL_TOL}
        assert not bad, f"rank {rank} of {world_size}: relative errors above {REL_TOL}: {bad}"


def _failing_job(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 would wait here forever without the harness killing it


def test_harness_reports_a_failing_rank() -> None:
    with pytest.raises(MultirankError, match="rank 1 fails on purpose") as info:
        run_multirank(_failing_job, 2, timeout_s=30.0)
    assert str(info.value).index("--- rank1 ---") < str(info.value).find("--- rank0 ---") or (
        "--- rank0 ---" not in str(info.value)
    )
