"""LayerNorm with fp32 statistics followed by a per-channel affine map, in one pass: the composite and a Triton kernel.

Also the gated residual ``(x.float() + y.float() * gate).to(x.dtype)`` that closes each half of a block, so that
on CUDA every token-local op of a block is a Triton kernel or a cuBLAS GEMM and the blocks need no torch.compile.

Each Wan block normalises its hidden states three times, always as ``LN(x.float()) * a + b`` rounded to x's dtype:
norm1 and norm3 (no affine of their own) with the timestep modulation ``a = 1 + scale``, ``b = shift`` per batch
row, and norm2 (cross-attention) with its affine ``a = weight``, ``b = bias``. torch.compile left them as three
reduction kernels at 2.2-2.8x the bandwidth floor (0.14-0.18 ms each at Wan-1.3B 480p, H100 profile);
the kernel reads x once and writes the result once. The composite is the spec and what CPUs run.
With ``fp8`` (``model.quant=fp8``, when the consumers are FP8 GEMMs) the result is written as e4m3 rows with one
scale per token (``models.fp8.Fp8Rows``, quantised from the float32 result: ``quantize_rows`` is the spec).
Legend: B batch, S tokens, C model width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from tessera.models.fp8 import FP8_DTYPE, FP8_MAX, FP8_MIN_AMAX, Fp8Rows, fp8_buffer, quantize_rows


def modulated_layer_norm_reference(x_BSC: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
                                   fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """``(LayerNorm(x.float()) * a + b).to(x.dtype)``; a, b fp32, [B, 1, C] or [C]. ``fp8``: the float32 result
    quantised per token instead (``Fp8Rows``)."""
    y = F.layer_norm(x_BSC.float(), (x_BSC.shape[-1],), eps=eps) * a + b
    return Fp8Rows(*quantize_rows(y)) if fp8 else y.to(x_BSC.dtype)


def gated_residual_reference(x_BSC: torch.Tensor, y_BSC: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``(x.float() + y.float() * gate).to(x.dtype)``; gate fp32, [B, 1, C] (one row per batch row) or [B, S, C]."""
    return (x_BSC.float() + y_BSC.float() * gate).to(x_BSC.dtype)


@functools.cache
def _kernel():
    """The Triton kernel, built on first use: importing models needs no Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def modulated_layer_norm_kernel(
        X, R, A, B, X_OUT, OUT, SCALE,  # X, R, X_OUT, OUT: [rows, C] row-major (rows = batch * seq_len); A, B: fp32
        seq_len, stride_ab, eps,  # stride_ab: elements between batch rows of A and B (0: one row for all)
        C: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr,
        FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        ok = cols < C
        x = tl.load(X + row * C + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:  # x + r rounded to x's dtype, as torch adds them; normalised after the rounding
            x = (x.to(tl.float32) + tl.load(R + row * C + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(X_OUT + row * C + cols, x, mask=ok)
        x = x.to(tl.float32)
        mean = tl.sum(x, 0) / C
        centred = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / C + eps)  # biased variance, as F.layer_norm
        ab = (row // seq_len) * stride_ab + cols
        a = tl.load(A + ab, mask=ok, other=0.0)
        b = tl.load(B + ab, mask=ok, other=0.0)
        y = centred * rstd * a + b
        if FP8_OUT:  # e4m3 with this row's scale (SCALE: [rows] float32), as models.fp8.quantize_rows
            amax = tl.maximum(tl.max(tl.where(ok, tl.abs(y), 0.0), 0), MIN_AMAX)
            tl.store(SCALE + row, tl.math.div_rn(amax, FP8_MAX))
            y = tl.clamp(y * tl.math.div_rn(FP8_MAX, amax), -FP8_MAX, FP8_MAX)
        tl.store(OUT + row * C + cols, y.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def gated_residual_kernel(
        X, Y, G, OUT,  # X, Y, OUT: [rows, C] row-major (rows = batch * seq_len); G: fp32 [batch, C]
        seq_len, C: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        ok = cols < C
        x = tl.load(X + row * C + cols, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(Y + row * C + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(G + (row // seq_len) * C + cols, mask=ok, other=0.0)
        tl.store(OUT + row * C + cols, (x + y * g).to(OUT.dtype.element_ty), mask=ok)

    return triton, modulated_layer_norm_kernel, gated_residual_kernel


def modulated_layer_norm_triton(
    x_BSC: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, residual_BSC: torch.Tensor | None = None,
    fp8: bool = False, num_warps: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The kernel: one program per token row. Returns the normalised x (``fp8``: e4m3 [B, S, C] and its scales
    [B, S, 1]); with a residual, x + residual is written into x itself first (each program reads its row before it
    writes it) and normalised. ``num_warps`` None: one per 256 columns up to 8 for rows up to 2048 wide, 4 for
    wider ones (`python bench/fp8_gemm.py` sweeps it; H200, width 5120 x 75600 rows: 0.41 ms at 4 warps, 0.77 at
    16, the old choice; width 1536: 0.096-0.107 ms at 2 to 8)."""
    triton, kernel, _ = _kernel()
    batch, seq_len, width = x_BSC.shape
    a_rows, b_rows = (t.float().reshape(-1, width).contiguous() for t in (a, b))
    if a_rows.shape != b_rows.shape or a_rows.shape[0] not in (1, batch):
        raise ValueError(f"modulated_layer_norm: a and b must be [{batch}, 1, {width}] or [{width}], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    x = x_BSC.contiguous()
    out = fp8_buffer(x.shape, x.device) if fp8 else torch.empty_like(x)
    scale = torch.empty(batch, seq_len, 1, device=x.device, dtype=torch.float32) if fp8 else a_rows
    block = triton.next_power_of_2(width)
    kernel[(batch * seq_len,)](
        x, x if residual_BSC is None else residual_BSC.to(x.dtype).contiguous(), a_rows, b_rows, x, out, scale,
        seq_len, width if a_rows.shape[0] > 1 else 0, eps,
        C=width, BLOCK_C=block, HAS_RESIDUAL=residual_BSC is not None,
        FP8_OUT=fp8, FP8_MAX=FP8_MAX, MIN_AMAX=FP8_MIN_AMAX,
        num_warps=num_warps or (4 if block > 2048 else max(1, min(8, block // 256))),
    )
    if residual_BSC is not None and x is not x_BSC:  # a strided x: its contiguous copy took the sum
        x_BSC.copy_(x)
    return (out.to(FP8_DTYPE), scale) if fp8 else out


def gated_residual_triton(x_BSC: torch.Tensor, y_BSC: torch.Tensor, gate_B1C: torch.Tensor) -> torch.Tensor:
    """The kernel: one program per token row, gate [B, 1, C] (one row per batch row)."""
    triton, _, kernel = _kernel()
    batch, seq_len, width = x_BSC.shape
    if tuple(gate_B1C.shape) != (batch, 1, width):
        raise ValueError(f"gated_residual: gate must be [{batch}, 1, {width}], got {tuple(gate_B1C.shape)}")
    x = x_BSC.contiguous()
    out = torch.empty_like(x)
    block = triton.next_power_of_2(width)
    kernel[(batch * seq_len,)](
        x, y_BSC.contiguous(), gate_B1C.float().contiguous(), out, seq_len,
        C=width, BLOCK_C=block, num_warps=max(1, min(16, block // 256)),
    )
    return out


@torch.library.custom_op("tessera::gated_residual", mutates_args=())
def _gated_residual_op(x_BSC: torch.Tensor, y_BSC: torch.Tensor, gate_B1C: torch.Tensor) -> torch.Tensor:
    return gated_residual_triton(x_BSC, y_BSC, gate_B1C)


@_gated_residual_op.register_fake
def _gated_residual_fake(x_BSC, y_BSC, gate_B1C):
    return torch.empty_like(x_BSC, memory_format=torch.contiguous_format)


def gated_residual(x_BSC: torch.Tensor, y_BSC: torch.Tensor, gate: torch.Tensor, fused: bool) -> torch.Tensor:
    """``(x.float() + y.float() * gate).to(x.dtype)`` for x, y [B, S, C]; gate fp32 [B, 1, C] (``fused``: the
    Triton op) or [B, S, C] (per-token modulation: always the composite)."""
    if not fused or gate.shape[1] != 1:
        return gated_residual_reference(x_BSC, y_BSC, gate)
    return _gated_residual_op(x_BSC, y_BSC, gate)


@torch.library.custom_op("tessera::modulated_layer_norm", mutates_args=())
def _modulated_layer_norm_op(x_BSC: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return modulated_layer_norm_triton(x_BSC, a, b, eps)


@_modulated_layer_norm_op.register_fake
def _modulated_layer_norm_fake(x_BSC, a, b, eps):
    return torch.empty_like(x_BSC, memory_format=torch.contiguous_format)


@torch.library.custom_op("tessera::add_modulated_layer_norm_", mutates_args=("x_BSC",))
def _add_modulated_layer_norm_op(
    x_BSC: torch.Tensor, residual_BSC: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float
) -> torch.Tensor:
    return modulated_layer_norm_triton(x_BSC, a, b, eps, residual_BSC)


@_add_modulated_layer_norm_op.register_fake
def _add_modulated_layer_norm_fake(x_BSC, residual_BSC, a, b, eps):
    return torch.empty_like(x_BSC, memory_format=torch.contiguous_format)


def _fp8_fake(x_BSC):
    return (torch.empty_like(x_BSC, dtype=FP8_DTYPE, memory_format=torch.contiguous_format),
            x_BSC.new_empty(*x_BSC.shape[:-1], 1, dtype=torch.float32))


@torch.library.custom_op("tessera::modulated_layer_norm_fp8", mutates_args=())
def _modulated_layer_norm_fp8_op(
    x_BSC: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return modulated_layer_norm_triton(x_BSC, a, b, eps, fp8=True)


@_modulated_layer_norm_fp8_op.register_fake
def _modulated_layer_norm_fp8_fake(x_BSC, a, b, eps):
    return _fp8_fake(x_BSC)


@torch.library.custom_op("tessera::add_modulated_layer_norm_fp8_", mutates_args=("x_BSC",))
def _add_modulated_layer_norm_fp8_op(
    x_BSC: torch.Tensor, residual_BSC: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return modulated_layer_norm_triton(x_BSC, a, b, eps, residual_BSC, fp8=True)


@_add_modulated_layer_norm_fp8_op.register_fake
def _add_modulated_layer_norm_fp8_fake(x_BSC, residual_BSC, a, b, eps):
    return _fp8_fake(x_BSC)


def modulated_layer_norm(x_BSC: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
                         fused: bool, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """``(LayerNorm(x.float()) * a + b).to(x.dtype)`` for x [B, S, C]; a, b fp32 [B, 1, C] or [C]. ``fused``:
    the Triton op (CUDA, or CPU under TRITON_INTERPRET=1), else the composite. ``fp8``: the float32 result
    quantised per token instead (``Fp8Rows``, for FP8 GEMMs)."""
    if not fused:
        return modulated_layer_norm_reference(x_BSC, a, b, eps, fp8)
    if fp8:
        return Fp8Rows(*_modulated_layer_norm_fp8_op(x_BSC, a, b, eps))
    return _modulated_layer_norm_op(x_BSC, a, b, eps)


def add_modulated_layer_norm_(x_BSC: torch.Tensor, residual_BSC: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                              eps: float, fused: bool, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """``x += residual`` in place, then returns ``modulated_layer_norm`` of the sum, in one pass when ``fused``
    (cross-attention's residual add with norm3 and its modulation). In place, so the block's hidden states before
    the add do not live on beside the sum through the FFN, the forward's memory peak."""
    if not fused:
        return modulated_layer_norm_reference(x_BSC.add_(residual_BSC), a, b, eps, fp8)
    if fp8:
        return Fp8Rows(*_add_modulated_layer_norm_fp8_op(x_BSC, residual_BSC, a, b, eps))
    return _add_modulated_layer_norm_op(x_BSC, residual_BSC, a, b, eps)
