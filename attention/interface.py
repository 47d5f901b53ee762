"""The attention backend protocol shared by every backend and by the SP wrapper.

Legend: B batch, N heads (a local slice after the Ulysses exchange), S tokens (full sequence), D head dim.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AttentionBackend(Protocol):
    """A self-attention kernel over the full sequence and a slice of heads.

    ``backend(q_BNSD, k_BNSD, v_BNSD, gate_BNSD)`` returns ``out_BNSD`` with the dtype of ``q``.
    ``gate_BNSD`` is passed (non-None) only to backends with ``uses_gate=True``; a gated backend
    treats ``None`` as "no gated branch". Inputs may be strided views (D contiguous). A backend with
    ``writes_out = True`` also takes ``out_BNSD=`` (q's shape and dtype, any D-contiguous layout), writes the
    result there and returns it: the SP wrapper passes its send buffer, saving a copy.
    """

    name: str
    uses_gate: bool

    def __call__(
        self,
        q_BNSD: torch.Tensor,
        k_BNSD: torch.Tensor,
        v_BNSD: torch.Tensor,
        gate_BNSD: torch.Tensor | None,
    ) -> torch.Tensor: ...
