"""Dense self-attention backend: PyTorch SDPA (cuDNN / flash on GPU, math on CPU).

Legend: B batch, N heads, S tokens, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tessera.attention.registry import Backend, register_backend
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN's fused attention is the fastest SDPA kernel on Hopper (~590 TFLOP/s at the Wan-1.3B shape vs ~370
# for flash); the others are fallbacks for shapes or dtypes it rejects, and MATH is the CPU path.
_GPU_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


class DenseAttention:
    """Exact softmax attention, scale ``1/sqrt(D)``, no mask, no gate.

    ``__call__(q_BNSD, k_BNSD, v_BNSD, gate_BNSD=None) -> out_BNSD``; all inputs share dtype and
    device; the sequence order is irrelevant (attention is permutation-equivariant).
    """

    name: str = "dense"
    uses_gate: bool = False
    kernel: str = "sdpa"  # reported

    def __call__(
        self,
        q_BNSD: torch.Tensor,
        k_BNSD: torch.Tensor,
        v_BNSD: torch.Tensor,
        gate_BNSD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if gate_BNSD is not None:
            # Internal contract: callers compute a gate only for backends with uses_gate=True.
            raise ValueError("DenseAttention has uses_gate=False; the caller must pass gate_BNSD=None")
        scale = 1.0 / math.sqrt(q_BNSD.shape[-1])
        if not q_BNSD.is_cuda:
            return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, scale=scale)
        with sdpa_kernel(_GPU_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, scale=scale)

    def __repr__(self) -> str:
        return "DenseAttention()"


DENSE_BACKEND = register_backend(Backend(
    name="dense",
    sparse=False,
    uses_gate=DenseAttention.uses_gate,
    check_supported=lambda dtype, head_dim, device, grid_thw: None,
    auto_problem=lambda device: None,
    build_metadata=None,
    token_order=lambda metadata: None,  # attention is permutation-equivariant: any order serves
    build=lambda metadata, dtype, head_dim: DenseAttention(),
))
