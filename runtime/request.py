"""Per-request state: everything that depends on the video shape, built once before the denoising loop.

RoPE tables (permuted to the token order and sharded), the sequence shard plan, VSA metadata, the
Ulysses-wrapped attention callables and one forward context per distinct step plan. The hot loop only
looks these up by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.attention import DenseAttention, VSAAttention, VSAMetadataCache
from tessera.models import WanForwardContext, WanTransformer
from tessera.parallel import ParallelMesh, SequenceShardPlan, UlyssesAttention
from tessera.runtime.plan import AttentionPlan


@dataclass
class RequestState:
    grid_thw: tuple[int, int, int]
    plan: AttentionPlan
    seq_plan: SequenceShardPlan
    contexts: dict[tuple, WanForwardContext] = field(default_factory=dict)

    def context_for_step(self, step: int) -> WanForwardContext:
        return self.contexts[self.plan.step_key(step)]


def build_request_state(
    model: WanTransformer,
    plan: AttentionPlan,
    grid_thw: tuple[int, int, int],
    mesh: ParallelMesh,
    metadata_cache: VSAMetadataCache,
) -> RequestState:
    """Build RoPE tables, shard plan, metadata and one forward context per distinct step plan."""
    device = mesh.device
    num_tokens = grid_thw[0] * grid_thw[1] * grid_thw[2]
    seq_plan = SequenceShardPlan(num_tokens, mesh.sp_size, mesh.sp_rank)
    num_heads = model.config.num_attention_heads

    token_order = token_order_inverse = None
    if plan.uses_vsa:
        any_sparsity = next(s for s in plan.sparsity_per_step if s is not None)
        order_meta = metadata_cache.get(grid_thw, any_sparsity, device)
        token_order = order_meta.tile_partition_indices.to(device)
        token_order_inverse = order_meta.reverse_tile_partition_indices.to(device)

    cos, sin = model.rope_tables(grid_thw, device)
    if token_order is not None:
        cos, sin = cos[token_order], sin[token_order]
    local_rope = (seq_plan.shard(cos, dim=0), seq_plan.shard(sin, dim=0))

    def ulysses(backend) -> UlyssesAttention:
        return UlyssesAttention(
            backend,
            sp_group=mesh.sp_group,
            sp_size=mesh.sp_size,
            sp_rank=mesh.sp_rank,
            seq_plan=seq_plan,
            num_heads=num_heads,
        )

    dense = ulysses(DenseAttention())
    sparse_by_sparsity: dict[float, UlyssesAttention] = {}
    state = RequestState(grid_thw=grid_thw, plan=plan, seq_plan=seq_plan)
    for step in range(len(plan.blocks_per_step)):
        key = plan.step_key(step)
        if key in state.contexts:
            continue
        blocks, sparsity = key
        if sparsity is not None and sparsity not in sparse_by_sparsity:
            meta = metadata_cache.get(grid_thw, sparsity, device)
            sparse_by_sparsity[sparsity] = ulysses(VSAAttention(meta, consume_q=True))  # q is dead after attention
        attn = tuple(sparse_by_sparsity[sparsity] if b == "vsa" else dense for b in blocks)
        state.contexts[key] = WanForwardContext(
            token_order=token_order,
            token_order_inverse=token_order_inverse,
            shard=seq_plan.shard,
            gather=lambda x: seq_plan.gather(x, mesh.sp_group, dim=1),
            rope=local_rope,
            attn=attn,
        )
    return state
