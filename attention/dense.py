"""Dense self-attention backend: PyTorch SDPA (cuDNN / flash on GPU, math on CPU).

Legend: B batch, N heads, S tokens, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class DenseAttention:
    """Exact softmax attention, scale ``1/sqrt(D)``, no mask, no gate.

    ``__call__(q_BNSD, k_BNSD, v_BNSD, gate_BNSD=None) -> out_BNSD``; all inputs share dtype and
    device; the sequence order is irrelevant (attention is permutation-equivariant).
    """

    name: str = "dense"
    uses_gate: bool = False

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
        return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, scale=scale)

    def __repr__(self) -> str:
        return "DenseAttention()"
