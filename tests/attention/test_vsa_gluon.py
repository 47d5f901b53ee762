"""The Gluon fine kernel (attention/vsa_gluon.py) on CPU: it compiles for sm_90 with the installed triton, and its
resource use keeps two programs per H100 SM, the occupancy its schedule is built for. Its numbers are checked on
GPU against the fp32 reference (tests/attention/test_vsa_triton.py, marked gpu)."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest
import torch

vsa_gluon = pytest.importorskip("tessera.attention.vsa_gluon")
if not vsa_gluon.HAVE_GLUON:
    pytest.skip("this triton has no Gluon", allow_module_level=True)

H100_SMEM_PER_SM = 228 * 1024
RESERVED_SMEM_PER_PROGRAM = 1024  # the driver's share of each resident program (cuobjdump's SHARED:1024)
H100_REGS_PER_SM = 65536


def _compile_for_hopper(has_gate: bool, stages: int, row_box: int, probe: int = 0):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    rows = torch.empty(4096, 128, dtype=torch.bfloat16)
    layout = gl.NVMMASharedLayout.get_default_for([vsa_gluon.BLOCK, 128], gl.bfloat16)
    tile = mangle_type(vsa_gluon.TensorDescriptor.from_tensor(rows, [vsa_gluon.BLOCK, 128], layout))
    box = mangle_type(vsa_gluon.TensorDescriptor.from_tensor(rows, [row_box, 128], layout))
    kernel = vsa_gluon._vsa_fine_gluon_kernel
    constants = dict(HAS_GATE=has_gate, NUM_STAGES=stages, ROW_BOX=row_box, PROBE=probe, num_warps=4)
    types = dict(q_desc=tile, k_desc=tile, v_desc=tile, g_desc=tile, o_desc=tile, kb_desc=box, vb_desc=box,
                 OUT="*bf16", COARSE="*bf16", TILE_OFFSETS="*i32", SPANS="*i32", qk_scale="fp32")
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, maxnreg=vsa_gluon.MAX_REGS))


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump (shipped with triton's NVIDIA backend) on a cubin."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("no cuobjdump in this triton")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> dict[str, int]:
    line = next(line for line in _cuobjdump(cubin, "-res-usage").splitlines() if "REG:" in line)
    fields = (field.split(":") for field in line.split() if ":" in field)
    return {key: int(value) for key, value in fields if value.isdigit()}


@pytest.mark.parametrize("has_gate", [True, False])
def test_compiles_for_hopper_with_two_programs_per_sm(has_gate: bool) -> None:
    kernel = _compile_for_hopper(has_gate, vsa_gluon.STAGES, vsa_gluon.ROW_BOX)
    usage = _resource_usage(kernel.asm["cubin"])
    # no spill traffic where the tensor cores run (some ptxas versions park one 64-bit value for the epilogue)
    sass = [line for line in _cuobjdump(kernel.asm["cubin"], "-sass").splitlines() if "/*" in line]
    mma = [i for i, line in enumerate(sass) if "HGMMA" in line]
    spills = [line.strip() for line in sass[mma[0]:mma[-1]] if " STL" in line or " LDL" in line]
    assert mma and not spills, spills[:4]
    threads = 2 * 4 * 32  # the consumer warpgroup + the producer warp, counted as a warpgroup
    assert 2 * usage["REG"] * threads <= H100_REGS_PER_SM, usage
    per_program = kernel.metadata.shared + RESERVED_SMEM_PER_PROGRAM
    assert 2 * per_program <= H100_SMEM_PER_SM, f"{per_program} bytes of shared memory per program"
    assert "setmaxnreg" in kernel.asm["ptx"]  # the warps are specialised: producer and consumer registers differ


def test_the_benchmark_probes_compile() -> None:
    """bench/attention.py --variants times the key stream alone and the arithmetic alone with these builds: the
    loads probe issues the full kernel's copies and no wgmma, the math probe its wgmmas and only Q's and the
    gate's copies."""
    sass = {probe: _cuobjdump(_compile_for_hopper(True, vsa_gluon.STAGES, vsa_gluon.ROW_BOX, number).asm["cubin"],
                              "-sass")
            for probe, number in vsa_gluon._PROBES.items()}
    copies = {probe: text.count("UTMALDG") for probe, text in sass.items()}
    assert copies["loads"] == copies[""] > copies["math"], copies
    assert "HGMMA" in sass[""] and "HGMMA" in sass["math"] and "HGMMA" not in sass["loads"]


def test_a_fourth_stage_would_not_fit_two_programs() -> None:
    """The ring depth is the shared memory budget: the limit the check above enforces is a real one."""
    kernel = _compile_for_hopper(True, vsa_gluon.STAGES + 1, vsa_gluon.ROW_BOX)
    assert 2 * (kernel.metadata.shared + RESERVED_SMEM_PER_PROGRAM) > H100_SMEM_PER_SM


def test_a_compile_error_hands_the_call_to_the_triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gluon's API moves between triton releases: a kernel that no longer compiles warns once, names the error and
    leaves the call (and every later one) to the Triton kernel; a forced Gluon launch raises it instead."""
    from tessera.attention import vsa_triton
    from triton.compiler.errors import CompilationError

    def no_longer_compiles(*args, **kwargs):
        raise CompilationError(None, None, "tma.async_copy_global_to_shared has been removed")

    monkeypatch.setattr(vsa_gluon, "launch_gluon_fine", no_longer_compiles)
    monkeypatch.setattr(vsa_triton, "_GLUON_BROKEN", [])
    q = torch.randn(1, 2, 64, 128, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 64], dtype=torch.int32)
    spans = torch.full((1, 2, 1, 1), 64, dtype=torch.int32)  # tile 0: start 0, 64 tokens
    out = torch.empty_like(q)
    views = [vsa_triton._host_desc_view(x) for x in (q, q, q, out)] + [None]
    call = (views, out, None, offsets, spans, None)
    with pytest.raises(CompilationError):
        vsa_triton._run_gluon(*call, forced=True)
    assert vsa_triton._GLUON_BROKEN == []
    with pytest.warns(RuntimeWarning, match="async_copy_global_to_shared has been removed"):
        assert vsa_triton._run_gluon(*call, forced=False) is None
    assert vsa_triton._GLUON_BROKEN == ["tma.async_copy_global_to_shared has been removed"]
    monkeypatch.setattr(vsa_gluon, "gluon_fine_supported", lambda q: True)  # as on an H100
    assert vsa_triton._gluon_views(q, q, q, out, None) is None
    monkeypatch.setattr(vsa_triton, "_GLUON_BROKEN", [])
    assert vsa_triton._gluon_views(q, q, q, out, None) is not None


def test_a_row_box_the_gpu_tests_do_not_check_is_refused() -> None:
    q = torch.empty(1, 1, 64, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="row_box must be 16, 32 or 64, got 8"):
        vsa_gluon.launch_gluon_fine([None] * 3, None, q, None, torch.zeros(1, 1, 1, 1, dtype=torch.int32), None,
                                    None, 1.0, row_box=8)
