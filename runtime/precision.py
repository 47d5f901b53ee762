"""`model.dtype=float32` means fp32 everywhere: TF32 off for cuDNN convolutions and cuBLAS matmuls while a request runs.

PyTorch lets cuDNN use TF32 in convolutions by default (`torch.backends.cudnn.allow_tf32 = True`), so on a GPU the DiT's
patch embedding and every Wan VAE convolution ran with a 10-bit mantissa: 2.8e-4 relative error on one fp32 forward
of a 12 x 128-head DiT against the CPU, 8e-7 with TF32 off (`bench/gpu_suite.sh product`). In bfloat16 runs the
flags are left as the process has them: the DiT's convolution is bf16 anyway and the fp32 VAE decode keeps TF32's
speed. The flags are process-wide, so they are set for the request and restored after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["exact_fp32"]


@contextlib.contextmanager
def exact_fp32(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Within the block, an fp32 request on CUDA runs its convolutions and matmuls in true fp32 (no TF32)."""
    if dtype != torch.float32 or device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
