"""FP8 (e4m3) linear layers for the DiT blocks (`model.quant=fp8`).

Recipe: each weight row (output channel) gets its own scale, amax / 448, fixed at load; each activation row (token)
gets its own scale, computed on the fly from that row's amax. ``torch._scaled_mm`` multiplies the two e4m3
matrices (Hopper's fast accumulation) and applies both scale vectors and the bias in its epilogue, writing the
model dtype (bfloat16). Row-wise activation scales keep one outlier token from crushing every other token's precision,
and per-channel weight scales do the same for outlier output channels.

The activations are quantised inside the kernel that produces them, so the blocks need no torch.compile: the
LayerNorm kernels write e4m3 rows and their scales (models/wan/modulated_norm.py) for the q/k/v/gate, cross-attention
q and FFN-up GEMMs, and one Triton kernel applies the FFN's GELU and quantises its wide output in one read
(``quantize_activation(..., gelu=True)``). The same kernel without GELU quantises the inputs that come from elsewhere
(the attention outputs before the out-projections). ``Fp8Rows`` carries a quantised activation between them.
They replace plain-torch quantisation that only torch.compile made fast enough (inductor fused it into the producers):
`python bench/fp8_gemm.py` times both at the 1.3B shapes (H200, 32760 rows: GELU + quantise at width 8960 0.32 ms
against the compiled spec's 1.28 ms); in the compiled design it took 49 ms of a 195 ms 1.3B VSA forward.

What is quantised: the q/k/v/out projections of self- and cross-attention, VSA's gate projection, I2V's image
key/value projections and both FFN layers, in every block. What stays in the model dtype: the patch embedding,
the time/text/image embedders (modulation), norms, SLA's per-head `proj_l`, the output head, and attention itself.
A layer whose in or out features are not multiples of 16 (the FP8 GEMM's alignment) stays in the model dtype.
One thing measured worse and dropped: q/k/v/gate fused into one GEMM (its strided outputs cost the attention more
than the GEMM saved: in one run the FP8 VSA forward took 232.6 ms against bf16's 219.4 ms).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "FP8_MIN_AMAX", "Fp8Linear", "Fp8Report", "Fp8Rows", "check_quant_supported",
    "dequantize_rows", "fp8_linear_reference", "quantize_activation", "quantize_blocks_fp8_", "quantize_rows",
    "takes_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_ALIGN = 16  # the FP8 GEMM needs K and N multiples of 16
FP8_MIN_AMAX = 1e-12  # floor of a row's amax: an all-zero row quantises to zeros instead of dividing by zero
# Hopper FP8 tensor cores accumulate in reduced precision unless told to promote: fast accumulation is what FP8
# inference stacks use for the forward; its error is inside the bound the quality benchmark states.
_FAST_ACCUM = True
# Names of the block linears that become FP8 (attribute paths below a WanBlock); absent ones are skipped.
_BLOCK_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1.to_gate_compress",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj",
    "ffn.net.0.proj", "ffn.net.2",
)


# The Triton interpreter (CPU) rounds some fp32 -> e4m3 casts wrongly (126.0 became 64.0 in one check): under it the
# kernels write the scaled fp32 values and torch casts them; on a GPU they write e4m3 themselves (Triton's cast
# there lands one e4m3 step from torch's on about 0.2% of values: tests/models/test_fp8.py on an H200).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Fp8Rows(NamedTuple):
    """An activation quantised per token: ``data`` [..., K] e4m3 and ``scale`` [..., 1] float32, x ~= data * scale.
    What the fused kernels hand an ``Fp8Linear`` instead of the model-dtype activation."""

    data: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return dequantize_rows(self.data, self.scale)


def quantize_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantisation: (x_fp8 [..., K], scale [..., 1] float32) with x ~= x_fp8 * scale; from x's
    values as float32 (no rounding to the model dtype first). The spec of every quantising kernel: per row
    ``amax = max(max|x|, 1e-12)``, ``x_fp8 = clamp(x * (448 / amax))``, ``scale = amax / 448``."""
    x = x_MK.float()
    amax_M1 = x.abs().amax(dim=-1, keepdim=True).clamp(min=FP8_MIN_AMAX)
    return (x * (FP8_MAX / amax_M1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), amax_M1 / FP8_MAX


def row_blocks(width: int) -> tuple[int, int]:
    """A row of ``width`` as two power-of-two register blocks (the second 0 when one fits exactly), so that a kernel
    holds the whole row with little masked waste: 8960 -> (8192, 1024), 1536 -> (1024, 512), 5120 -> (4096, 1024)."""
    first = 1 << (width.bit_length() - 1)
    rest = width - first
    return first, 0 if rest == 0 else 1 << (rest - 1).bit_length()


@functools.cache
def _kernel():
    """The Triton kernel, built on first use: importing models needs no Triton."""
    import triton.language as tl
    from triton import jit

    @jit
    def quantize_rows_kernel(
        X, OUT, SCALE,  # X, OUT: [rows, K] row-major; SCALE: [rows] float32
        K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, GELU: tl.constexpr,
        FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
    ):
        # One pass: the row (two register blocks, ``row_blocks``) is read once, GELU(tanh) applied once, reduced
        # to its amax, scaled and written. GELU: 0.5 x (1 + tanh(u)) = x * sigmoid(2u),
        # u = sqrt(2/pi) (x + 0.044715 x^3).
        row = tl.program_id(0).to(tl.int64)
        cols_a = tl.arange(0, BLOCK_A)
        a = tl.load(X + row * K + cols_a, mask=cols_a < K, other=0.0).to(tl.float32)
        if GELU:
            a = a * tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a))
        amax = tl.max(tl.abs(a), 0)
        if BLOCK_B > 0:
            cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
            b = tl.load(X + row * K + cols_b, mask=cols_b < K, other=0.0).to(tl.float32)
            if GELU:
                b = b * tl.sigmoid(1.5957691216057308 * (b + 0.044715 * b * b * b))
            amax = tl.maximum(amax, tl.max(tl.abs(b), 0))
        amax = tl.maximum(amax, MIN_AMAX)
        tl.store(SCALE + row, tl.math.div_rn(amax, FP8_MAX))  # correctly rounded, as torch divides
        inv = tl.math.div_rn(FP8_MAX, amax)
        tl.store(OUT + row * K + cols_a, tl.clamp(a * inv, -FP8_MAX, FP8_MAX).to(OUT.dtype.element_ty),
                 mask=cols_a < K)
        if BLOCK_B > 0:
            tl.store(OUT + row * K + cols_b, tl.clamp(b * inv, -FP8_MAX, FP8_MAX).to(OUT.dtype.element_ty),
                     mask=cols_b < K)

    return quantize_rows_kernel


def fp8_buffer(shape, device) -> torch.Tensor:
    """The output buffer of a quantising kernel: e4m3, or float32 under the interpreter (see ``_INTERPRET``)."""
    return torch.empty(shape, device=device, dtype=torch.float32 if _INTERPRET else FP8_DTYPE)


def quantize_rows_triton(x: torch.Tensor, gelu: bool = False,
                         num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel: one program per row of x [..., K] -> (e4m3 [..., K], scale [..., 1] float32). ``num_warps``
    None: about one warp per 1024 values of the row, 2 to 8 (`python bench/fp8_gemm.py` sweeps it; H200, 32760 rows:
    width 8960 with GELU 0.32 ms at 8 warps, 0.36 at 16, 0.37 at 2; width 1536 0.066 ms at 2)."""
    x = x.contiguous()
    width = x.shape[-1]
    block_a, block_b = row_blocks(width)
    if num_warps is None:
        num_warps = min(8, max(2, 1 << max(0, ((block_a + block_b) // 1024).bit_length() - 1)))
    out = fp8_buffer(x.shape, x.device)
    scale = torch.empty(*x.shape[:-1], 1, device=x.device, dtype=torch.float32)
    _kernel()[(x.numel() // width,)](x, out, scale, K=width, BLOCK_A=block_a, BLOCK_B=block_b, GELU=gelu,
                                     FP8_MAX=FP8_MAX, MIN_AMAX=FP8_MIN_AMAX, num_warps=num_warps)
    return out.to(FP8_DTYPE), scale


@torch.library.custom_op("tessera::quantize_rows_fp8", mutates_args=())
def _quantize_rows_op(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows_triton(x, gelu)


@_quantize_rows_op.register_fake
def _quantize_rows_fake(x, gelu):
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


def quantize_activation(x: torch.Tensor, fused: bool, gelu: bool = False) -> Fp8Rows:
    """``quantize_rows`` of x (of GELU(tanh)(x) computed in float32, with ``gelu``) as ``Fp8Rows``. ``fused``: the
    Triton op, one read of x (CUDA, or CPU under TRITON_INTERPRET=1), else the composite."""
    if fused:
        return Fp8Rows(*_quantize_rows_op(x, gelu))
    return Fp8Rows(*quantize_rows(F.gelu(x.float(), approximate="tanh") if gelu else x))


def takes_fp8(*layers: nn.Module | None) -> bool:
    """Whether every given layer (None: absent, skipped) is an ``Fp8Linear``: then their shared input can be handed
    to them quantised once (``Fp8Rows``)."""
    present = [layer for layer in layers if layer is not None]
    return bool(present) and all(isinstance(layer, Fp8Linear) for layer in present)


def dequantize_rows(x_fp8: torch.Tensor, scale_M1: torch.Tensor) -> torch.Tensor:
    """float32 values of a row-wise quantised matrix."""
    return x_fp8.float() * scale_M1


class Fp8Linear(nn.Module):
    """``nn.Linear`` with an e4m3 weight [out, in] and per-output-channel scales, writing ``out_dtype``. Its input is
    a model-dtype activation, quantised per token on every call (the Triton kernel on CUDA), or ``Fp8Rows`` a fused
    kernel already quantised. Inference only (no autograd through the FP8 GEMM)."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale_1N: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_fp8.shape[1], weight_fp8.shape[0]
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight_fp8)
        self.register_buffer("weight_scale", weight_scale_1N)
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        weight_fp8, scale_N1 = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight_fp8, scale_N1.reshape(1, -1).contiguous(), bias, linear.weight.dtype)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        rows = x if isinstance(x, Fp8Rows) else quantize_activation(x, fused=x.is_cuda or _INTERPRET)
        lead = rows.data.shape[:-1]
        out = torch._scaled_mm(
            rows.data.reshape(-1, self.in_features), self.weight.t(), scale_a=rows.scale.reshape(-1, 1),
            scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype, use_fast_accum=_FAST_ACCUM,
        )
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-channel x per-token"


def fp8_linear_reference(x: torch.Tensor, layer: Fp8Linear) -> torch.Tensor:
    """The slow reference of ``Fp8Linear``: both operands quantised and dequantised as the layer does, then a
    float32 matmul (+ bias). [..., out] float32."""
    x_fp8, scale_M1 = quantize_rows(x.reshape(-1, layer.in_features))
    weight = dequantize_rows(layer.weight, layer.weight_scale.reshape(-1, 1))
    out = dequantize_rows(x_fp8, scale_M1) @ weight.t()
    if layer.bias is not None:
        out = out + layer.bias.float()
    return out.view(*x.shape[:-1], layer.out_features)


@dataclass(frozen=True)
class Fp8Report:
    """What ``quantize_blocks_fp8_`` did (the report's `load.quant`)."""

    layers: int  # linears now FP8
    kept: tuple[str, ...]  # block linears left in the model dtype (alignment), by name
    bytes_before: int
    bytes_after: int

    def as_dict(self) -> dict:
        return {"mode": "fp8", "format": "e4m3", "weight_scales": "per output channel",
                "activation_scales": "per token", "layers": self.layers, "kept_in_model_dtype": list(self.kept),
                "linear_bytes_before": self.bytes_before, "linear_bytes_after": self.bytes_after}


def _parent(module: nn.Module, path: str) -> tuple[nn.Module | None, str]:
    """(the module holding `path`'s last name, that name); a ModuleList's children are attributes "0", "1", ..."""
    *parents, leaf = path.split(".")
    for name in parents:
        module = getattr(module, name, None)
        if module is None:
            break
    return module, leaf


def quantize_blocks_fp8_(model: nn.Module) -> Fp8Report:
    """Replace the block linears of a loaded DiT (``model.blocks``) by ``Fp8Linear``s, in place, one layer at a
    time (the peak is the model plus one layer's FP8 copy)."""
    layers, kept, before, after = 0, [], 0, 0
    for index, block in enumerate(model.blocks):
        for path in _BLOCK_LINEARS:
            parent, leaf = _parent(block, path)
            linear = getattr(parent, leaf, None)
            if not isinstance(linear, nn.Linear):
                continue
            if linear.in_features % _ALIGN or linear.out_features % _ALIGN:
                kept.append(f"blocks.{index}.{path}")
                continue
            fp8 = Fp8Linear.from_linear(linear)
            before += sum(t.numel() * t.element_size() for t in linear.parameters())
            after += sum(t.numel() * t.element_size() for t in fp8.buffers())
            setattr(parent, leaf, fp8)
            layers += 1
    return Fp8Report(layers, tuple(kept), before, after)


def check_quant_supported(quant: str, device: torch.device) -> None:
    """ValueError naming `model.quant` and the fix when FP8 cannot run on `device` (before any weight loads)."""
    if quant == "none":
        return
    if device.type != "cuda":
        raise ValueError(f"model.quant=fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or "
                         f"newer: Ada, Hopper, Blackwell); this rank's device is {device.type}: set model.quant=none")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"model.quant=fp8 needs FP8 tensor cores (compute capability 8.9 or newer); {name} has "
                         f"{major}.{minor}: set model.quant=none")
