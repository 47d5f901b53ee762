"""`exact_fp32`: TF32 off for cuDNN and cuBLAS inside an fp32 CUDA request, the process's flags restored after."""

import pytest
import torch
from tessera.runtime.precision import exact_fp32


@pytest.mark.parametrize("raise_inside", [False, True])
def test_fp32_cuda_request_turns_tf32_off_and_restores(raise_inside):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError) if raise_inside else _nothing():
            with exact_fp32(torch.float32, torch.device("cuda", 0)):
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
                if raise_inside:
                    raise RuntimeError("boom")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize(("dtype", "device"), [(torch.bfloat16, "cuda"), (torch.float32, "cpu")])
def test_other_requests_leave_the_flags_alone(dtype, device):
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with exact_fp32(dtype, torch.device(device)):
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
