"""FP8 (e4m3) linear layers for the DiT blocks (`model.quant=fp8`).

Recipe: each weight row (output channel) gets its own scale, amax / 448, fixed at load; each activation row (token)
gets its own scale, computed on the fly from that row's amax. ``torch._scaled_mm`` multiplies the two e4m3
matrices (Hopper's fast accumulation) and applies both scale vectors and the bias in its epilogue, writing the
model dtype (bfloat16). Row-wise activation scales keep one outlier token from crushing every other token's precision,
and per-channel weight scales do the same for outlier output channels. The quantisation of x is a row amax and a
divide in plain torch: with model.quant=fp8 the block stages are always compiled on CUDA
(runtime/build.py `compiles_stages`), and inductor fuses it with the op that produced x
(the FFN's GELU above all). Two things measured worse on an H200 and were dropped: a one-row-per-program Triton
kernel for it (python bench/fp8_gemm.py: 2.22 ms vs inductor's 0.875 ms at 32760 x 8960), and q/k/v/gate fused
into one GEMM (its strided outputs cost the attention more than the GEMM saved: in one run the FP8 VSA forward took
232.6 ms against bf16's 219.4 ms, its attention 86.0 ms against 63.9 ms).

What is quantised: the q/k/v/out projections of self- and cross-attention, VSA's gate projection, I2V's image
key/value projections and both FFN layers, in every block. What stays in the model dtype: the patch embedding,
the time/text/image embedders (modulation), norms, SLA's per-head `proj_l`, the output head, and attention itself.
A layer whose in or out features are not multiples of 16 (the FP8 GEMM's alignment) stays in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "Fp8Linear", "Fp8Report", "check_quant_supported", "dequantize_rows",
    "fp8_linear_reference", "quantize_blocks_fp8_", "quantize_rows",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_ALIGN = 16  # the FP8 GEMM needs K and N multiples of 16
_MIN_SCALE = 1e-12  # an all-zero row quantises to zeros with this scale instead of dividing by zero
# Hopper FP8 tensor cores accumulate in reduced precision unless told to promote: fast accumulation is what FP8
# inference stacks use for the forward; its error is inside the bound the quality benchmark states.
_FAST_ACCUM = True
# Names of the block linears that become FP8 (attribute paths below a WanBlock); absent ones are skipped.
_BLOCK_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1.to_gate_compress",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj",
    "ffn.net.0.proj", "ffn.net.2",
)


def quantize_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantisation: (x_fp8 [M, K], scale [M, 1] float32) with x ~= x_fp8 * scale."""
    x = x_MK.float()
    scale_M1 = x.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_SCALE) / FP8_MAX
    return (x / scale_M1).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_M1


def dequantize_rows(x_fp8: torch.Tensor, scale_M1: torch.Tensor) -> torch.Tensor:
    """float32 values of a row-wise quantised matrix."""
    return x_fp8.float() * scale_M1


class Fp8Linear(nn.Module):
    """``nn.Linear`` with an e4m3 weight [out, in] and per-output-channel scales; activations are quantised per
    token on every call. Inference only (no autograd through the FP8 GEMM)."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale_1N: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_fp8.shape[1], weight_fp8.shape[0]
        self.register_buffer("weight", weight_fp8)
        self.register_buffer("weight_scale", weight_scale_1N)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        weight_fp8, scale_N1 = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight_fp8, scale_N1.reshape(1, -1).contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp8, scale_M1 = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            x_fp8, self.weight.t(), scale_a=scale_M1, scale_b=self.weight_scale,
            bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype, use_fast_accum=_FAST_ACCUM,
        )
        return out.view(*x.shape[:-1], self.out_features)

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
