"""Per-request state: everything that depends on the video shape, built once before the denoising loop.

RoPE tables (permuted to the token order and sharded), the sequence shard plan, VSA metadata, the
Ulysses-wrapped attention callables, the clean-token selector of a request whose first latent frame is kept clean
(Wan2.2 TI2V from an image) and one forward context per distinct step plan. The hot loop only looks these up by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.attention import MetadataCache, get_backend
from tessera.attention.vsa import on_device
from tessera.models.family import DiT, ForwardContext
from tessera.parallel import ParallelMesh, SequenceShardPlan, UlyssesAttention
from tessera.runtime.plan import AttentionPlan


@dataclass
class RequestState:
    grid_thw: tuple[int, int, int]
    plan: AttentionPlan
    seq_plan: SequenceShardPlan
    contexts: dict[tuple, ForwardContext] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # backend name -> the kernel its callable runs (reported)

    def context_for_step(self, step: int) -> ForwardContext:
        return self.contexts[self.plan.step_key(step)]


def build_request_state(
    model: DiT,
    plan: AttentionPlan,
    grid_thw: tuple[int, int, int],
    mesh: ParallelMesh,
    metadata_cache: MetadataCache,
    *,
    clean_first_frame: bool = False,
) -> RequestState:
    """Build RoPE tables, shard plan, metadata and one forward context per distinct step plan. `clean_first_frame`:
    the first latent frame's tokens run at timestep 0 (the contexts' `clean_tokens`, in this rank's token order)."""
    device = mesh.device
    num_tokens = grid_thw[0] * grid_thw[1] * grid_thw[2]
    seq_plan = SequenceShardPlan(num_tokens, mesh.sp_size, mesh.sp_rank)
    num_heads = model.config.num_attention_heads
    head_dim = model.config.attention_head_dim

    token_order, token_order_inverse = _token_order(plan, grid_thw, device, metadata_cache)
    order = None if token_order is None else on_device(token_order, device)  # dropped after this build
    cos, sin = model.rope_tables(grid_thw, device)
    if order is not None:
        cos, sin = cos[order], sin[order]
    local_rope = (seq_plan.shard(cos, dim=0), seq_plan.shard(sin, dim=0))
    local_clean = None
    if clean_first_frame:
        clean = model.first_frame_tokens(grid_thw, device)
        local_clean = seq_plan.shard(clean if order is None else clean[order], dim=0).contiguous()
    del order

    callables: dict[tuple[str, float | None], UlyssesAttention] = {}  # (backend, sparsity) -> callable
    state = RequestState(grid_thw=grid_thw, plan=plan, seq_plan=seq_plan)
    for step in range(len(plan.blocks_per_step)):
        key = plan.step_key(step)
        if key in state.contexts:
            continue
        blocks, sparsity = key
        for name in dict.fromkeys(blocks):
            backend = get_backend(name)
            callable_key = (name, sparsity if backend.sparse else None)
            if callable_key not in callables:
                meta = metadata_cache.get(backend, grid_thw, callable_key[1], device, plan.options_for(backend))
                attn = backend.build(meta, None, head_dim)  # dtype None: the kernel checks each call's
                state.kernels[name] = attn.kernel
                callables[callable_key] = _per_layer(backend, attn, model, mesh, seq_plan, num_heads)
        attn = tuple(callables[(b, sparsity if get_backend(b).sparse else None)][i] for i, b in enumerate(blocks))
        state.contexts[key] = ForwardContext(
            token_order=token_order,
            token_order_inverse=token_order_inverse,
            shard=seq_plan.shard,
            gather=lambda x: seq_plan.gather(x, mesh.sp_group, dim=1),
            rope=local_rope,
            attn=attn,
            clean_tokens=local_clean,
        )
    return state


def _per_layer(backend, attn, model: DiT, mesh, seq_plan, num_heads: int) -> tuple:
    """One Ulysses-wrapped callable per block: the same object for every block, or for a backend with per-layer
    weights (``Backend.bind_layer``, e.g. SLA's proj_l) a copy bound to each block's self-attention module."""
    if backend.bind_layer is None:
        return (UlyssesAttention.from_mesh(attn, mesh, seq_plan, num_heads),) * len(model.blocks)
    return tuple(UlyssesAttention.from_mesh(backend.bind_layer(attn, block.attn1), mesh, seq_plan, num_heads)
                 for block in model.blocks)


def _token_order(plan: AttentionPlan, grid_thw, device, metadata_cache: MetadataCache) -> tuple:
    """(order, inverse) that every backend in use accepts, or (None, None) for raster order."""
    orders = {}
    for backend in plan.backends_in_use:
        any_sparsity = next((s for s in plan.sparsity_per_step if s is not None), None)
        sparsity = any_sparsity if backend.takes_sparsity else None
        order = backend.token_order(metadata_cache.get(backend, grid_thw, sparsity, device, plan.options_for(backend)))
        if order is not None:
            orders[backend.name] = order
    if len(orders) > 1:  # the token order is permuted once per forward, so all blocks must share it
        raise ValueError(f"attention backends {sorted(orders)} want different token orders; run one per request")
    return next(iter(orders.values()), (None, None))
