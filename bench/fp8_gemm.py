"""FP8 GEMMs at the 1.3B DiT's shapes (480x832x81: 32760 tokens) against bf16, on one GPU.

    python bench/fp8_gemm.py --out fp8_gemm.json

For each (tokens, in, out): bf16 `F.linear`; `torch._scaled_mm` on already-quantised operands with row-wise scales
(fast accumulation on and off) and with one scale per tensor; the activation quantisation alone (torch.compile'd
spec); and the whole `Fp8Linear` call (quantisation + GEMM), eager and under torch.compile. Milliseconds are
medians of CUDA-event timings; TFLOP/s count 2*M*K*N.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import cuda_time_ms  # noqa: E402
from tessera.models.fp8 import FP8_DTYPE, Fp8Linear, quantize_rows  # noqa: E402

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
        "fp8_linear": lambda: layer(x),
        "fp8_linear_compiled": lambda: compiled_layer(x),
    }
    row: dict = {"m": m, "k": k, "n": n, "fp8_dtype": str(FP8_DTYPE)}
    for name, fn in timings.items():
        ms = cuda_time_ms(fn, 3, 20)
        row[name] = {"ms": ms, "tflops": 2 * m * k * n / ms / 1e9}
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
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
