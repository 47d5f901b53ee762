"""q/k RMSNorm over all heads + RoPE in one pass: the torch composite (the spec) and a Triton kernel.

Wan normalises q and k over the full model width (all heads), then rotates head-dim pairs (2i, 2i+1) with
fp32 cos/sin tables. The composite is what eager code and CPUs run; on CUDA, ``WanTransformer.use_fast_stages``
switches to ``tessera::qk_norm_rope``, one launch for q and k that reads each once and writes each once
(torch.compile left the two as a reduction kernel at ~3x the bandwidth floor).
Legend: B batch, S tokens, C model width (N heads x D head dim).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def apply_rotary(x_BSND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of [B, S, N, D] by ``cos/sin`` [S, D/2] (fp32); returns x's dtype."""
    x1, x2 = x_BSND.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    # fp32 tables promote the products to fp32, as in diffusers, before rounding to the activation dtype.
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x_BSND.dtype)


def qk_norm_rope_reference(
    q_BSC: torch.Tensor, k_BSC: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over C (with weight), then RoPE per head: two [B, S, N, D] tensors in the input dtype."""
    def one(x_BSC: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x_BSC, (x_BSC.shape[-1],), weight, eps)
        return apply_rotary(normed.unflatten(2, (num_heads, -1)), cos, sin)

    return one(q_BSC, weight_q), one(k_BSC, weight_k)


@functools.cache
def _kernel():
    """(triton, the kernel), built on first use: importing models needs no Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def qk_norm_rope_kernel(
        X0, X1, W0, W1, OUT0, OUT1,  # X*, OUT*: [rows, C] row-major (rows = B * S); W*: [C]
        COS, SIN,  # fp32 [S, D/2]
        seq_len, eps,
        C: tl.constexpr, HALF_D: tl.constexpr, PAIRS_PAD: tl.constexpr,  # PAIRS_PAD: next pow2 >= C / 2
    ):
        row = tl.program_id(0).to(tl.int64)
        which = tl.program_id(1)  # q, k in one launch
        if which == 0:
            X, W, OUT = X0, W0, OUT0
        else:
            X, W, OUT = X1, W1, OUT1
        pair = tl.arange(0, PAIRS_PAD)
        ok = (pair < C // 2)[:, None]
        offsets = 2 * pair[:, None] + tl.arange(0, 2)[None, :]  # [pairs, 2]: (x[2i], x[2i+1]) side by side
        x1, x2 = tl.split(tl.load(X + row * C + offsets, mask=ok, other=0.0).to(tl.float32))
        rstd = tl.math.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / C + eps)
        w1, w2 = tl.split(tl.load(W + offsets, mask=ok, other=0.0).to(tl.float32))
        dtype = OUT.dtype.element_ty
        # the norm's output is rounded to the activation dtype, as the composite's rms_norm returns it
        y1 = (x1 * rstd * w1).to(dtype).to(tl.float32)
        y2 = (x2 * rstd * w2).to(dtype).to(tl.float32)
        table = (row % seq_len) * HALF_D + pair % HALF_D
        cos = tl.load(COS + table, mask=pair < C // 2, other=0.0)
        sin = tl.load(SIN + table, mask=pair < C // 2, other=0.0)
        out = tl.join(y1 * cos - y2 * sin, y1 * sin + y2 * cos).to(dtype)
        tl.store(OUT + row * C + offsets, out, mask=ok)

    return triton, qk_norm_rope_kernel


def qk_norm_rope_triton(
    q_BSC: torch.Tensor, k_BSC: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel behind ``tessera::qk_norm_rope``: [B, S, C] inputs (any dtype of the activations,
    made contiguous), [S, D/2] fp32 tables -> two new [B, S, C] tensors (view them as [B, S, N, D])."""
    triton, kernel = _kernel()
    batch, seq_len, width = q_BSC.shape
    q, k = q_BSC.contiguous(), k_BSC.contiguous()
    out_q, out_k = torch.empty_like(q), torch.empty_like(k)
    pairs_pad = triton.next_power_of_2(width // 2)
    kernel[(batch * seq_len, 2)](
        q, k, weight_q.contiguous(), weight_k.contiguous(), out_q, out_k,
        cos.float().contiguous(), sin.float().contiguous(), seq_len, eps,
        C=width, HALF_D=width // num_heads // 2, PAIRS_PAD=pairs_pad,
        num_warps=max(1, min(8, pairs_pad // 256)),
    )
    return out_q, out_k


@torch.library.custom_op("tessera::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q_BSC: torch.Tensor, k_BSC: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_triton(q_BSC, k_BSC, weight_q, weight_k, eps, cos, sin, num_heads)


@_qk_norm_rope_op.register_fake
def _qk_norm_rope_fake(q_BSC, k_BSC, weight_q, weight_k, eps, cos, sin, num_heads):
    return torch.empty_like(q_BSC, memory_format=torch.contiguous_format), torch.empty_like(
        k_BSC, memory_format=torch.contiguous_format
    )


def qk_norm_rope(
    q_BSC: torch.Tensor, k_BSC: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int, fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k [B, S, C] -> RMSNorm (over C) + RoPE -> two [B, S, N, D]. ``fused``: the Triton op (CUDA, or
    CPU under TRITON_INTERPRET=1), else the composite."""
    if not fused:
        return qk_norm_rope_reference(q_BSC, k_BSC, weight_q, weight_k, eps, cos, sin, num_heads)
    q, k = _qk_norm_rope_op(q_BSC, k_BSC, weight_q, weight_k, eps, cos, sin, num_heads)
    heads = (num_heads, -1)
    return q.unflatten(2, heads), k.unflatten(2, heads)
