"""FP8 GEMMs at the 1.3B DiT's shapes (480x832x81: 32760 tokens) against bf16, on one GPU.

    python bench/fp8_gemm.py --out fp8_gemm.json

For each (tokens, in, out): bf16 `F.linear`; `torch._scaled_mm` on already-quantised operands with row-wise scales
(fast accumulation on and off) and with one scale per tensor; the activation quantisation alone: the Triton kernel
(models/fp8.py, with and without the FFN's GELU, at a few warp counts) against the torch.compile'd spec; the whole
`Fp8Linear` call (quantisation + GEMM), eager and under torch.compile; and at the model width the modulated
LayerNorm kernel writing bf16 and e4m3, at a few warp counts. Milliseconds are medians of CUDA-event
timings; TFLOP/s count 2*M*K*N (the quantisation rows too: read them as a rate, not as FLOPs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import cuda_time_ms  # noqa: E402
from tessera.models.fp8 import FP8_DTYPE, Fp8Linear, quantize_rows, quantize_rows_triton  # noqa: E402

SHAPES = ((32760, 1536, 8960), (32760, 8960, 1536), (32760, 1536, 1536), (32760, 1536, 6144))


def time_shape(m: int, k: int, n: int) -> dict:
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    linear = torch.nn.Linear(k, n).to("cuda", torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    x_fp8, x_scale = quantize_rows(x)
    w_t = layer.weight.t()
    one = torch.ones((), device="cuda")
    compiled_layer, compiled_quantize = torch.compile(layer), torch.compile(quantize_rows)
    compiled_gelu_quantize = torch.compile(lambda t: quantize_rows(F.gelu(t.float(), approximate="tanh")))

    def scaled(fast: bool, rowwise: bool = True):
        return lambda: torch._scaled_mm(
            x_fp8, w_t, scale_a=x_scale if rowwise else one, scale_b=layer.weight_scale if rowwise else one,
            bias=layer.bias, out_dtype=torch.bfloat16, use_fast_accum=fast)

    timings = {
        "bf16_linear": lambda: F.linear(x, linear.weight, linear.bias),
        "fp8_rowwise_fast_accum": scaled(True),
        "fp8_rowwise": scaled(False),
        "fp8_tensorwise_fast_accum": scaled(True, rowwise=False),
        "quantize_rows_torch_compiled": lambda: compiled_quantize(x),
        "quantize_rows_triton": lambda: quantize_rows_triton(x),
        "gelu_quantize_torch_compiled": lambda: compiled_gelu_quantize(x),
        "gelu_quantize_triton": lambda: quantize_rows_triton(x, gelu=True),
        **{f"gelu_quantize_triton_{warps}warps": (lambda warps=warps: quantize_rows_triton(x, True, num_warps=warps))
           for warps in (2, 4, 8, 16)},
        "fp8_linear": lambda: layer(x),
        "fp8_linear_compiled": lambda: compiled_layer(x),
    }
    row: dict = {"m": m, "k": k, "n": n, "fp8_dtype": str(FP8_DTYPE)}
    for name, fn in timings.items():
        ms = cuda_time_ms(fn, 3, 20)
        row[name] = {"ms": ms, "tflops": 2 * m * k * n / ms / 1e9}
    return row


def time_layer_norm(m: int, c: int) -> dict:
    """The modulated LayerNorm kernel (models/wan/modulated_norm.py) at [1, m, c], bf16 and e4m3 out."""
    from tessera.models.wan.modulated_norm import modulated_layer_norm_triton

    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(1, m, c, generator=g).to("cuda", torch.bfloat16)
    a, b = (torch.randn(1, 1, c, generator=g).to("cuda") for _ in range(2))
    row: dict = {"m": m, "c": c}
    for warps in (None, 2, 4, 8):
        for fp8 in (False, True):
            name = f"layer_norm_{'fp8' if fp8 else 'bf16'}_{warps or 'default'}warps"
            row[name] = cuda_time_ms(lambda fp8=fp8, warps=warps: modulated_layer_norm_triton(
                x, a, b, 1e-6, fp8=fp8, num_warps=warps), 3, 20)
    return row


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for m, k, n in SHAPES:
        row = time_shape(m, k, n)
        results["rows"].append(row)
        print(json.dumps({f"{m}x{k}x{n}": {name: round(v["ms"], 3) for name, v in row.items()
                                            if isinstance(v, dict)}}))
    for m, c in ((32760, 1536), (75600, 5120)):
        row = time_layer_norm(m, c)
        results["rows"].append(row)
        print(json.dumps({f"layer_norm {m}x{c}": {k: round(v, 3) for k, v in row.items() if k not in ("m", "c")}}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
