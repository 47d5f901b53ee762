"""Model-agnostic parallelism: the (cfg x sp) mesh, sequence shard plans, Ulysses attention and the halo exchange.

Imports only torch (and, for types, the attention interface). Nothing here holds module-level state:
``build_mesh`` returns the one mesh object; plans and wrappers are built per request and passed.
"""

from tessera.parallel.halo import RowSplit, build_row_split
from tessera.parallel.mesh import (
    ParallelMesh,
    build_mesh,
    destroy_process_group_safely,
    init_process_group_from_env,
    warmup_collectives,
)
from tessera.parallel.sequence import SequenceShardPlan, split_sizes
from tessera.parallel.ulysses import UlyssesAttention

__all__ = [
    "ParallelMesh",
    "RowSplit",
    "SequenceShardPlan",
    "UlyssesAttention",
    "build_mesh",
    "build_row_split",
    "destroy_process_group_safely",
    "init_process_group_from_env",
    "split_sizes",
    "warmup_collectives",
]
