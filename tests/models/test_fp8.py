"""FP8 block linears (`model.quant=fp8`, models/fp8.py) against their dequantised reference, on the CPU (torch's CPU
`_scaled_mm`) and on the GPU tier; the quantising kernels (per-row quantisation, with GELU, and the LayerNorms' e4m3
output) against `quantize_rows` of the float32 spec, interpreted on the CPU (this file run as a script under
TRITON_INTERPRET=1) and on the GPU; the quantised DiT against the unquantised one; the config and device errors."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from _tiny import TINY  # tests/models is on sys.path under pytest (no __init__.py)
from tessera.models.fp8 import (
    FP8_MAX,
    Fp8Linear,
    Fp8Rows,
    check_quant_supported,
    dequantize_rows,
    fp8_linear_reference,
    quantize_blocks_fp8_,
    quantize_rows,
)
from tessera.models.wan import WanConfig, build_wan_on_meta, materialize_random_
from tessera.runtime.config import GenerateConfig, ModelConfig
from torch import nn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _awkward_input(shape, generator, device="cpu") -> torch.Tensor:
    """Random rows with one outlier token (x1000) and one all-zero token: per-token scales must isolate both."""
    x = torch.randn(*shape, generator=generator).to(device)
    x.view(-1, shape[-1])[1] *= 1000.0
    x.view(-1, shape[-1])[2] = 0.0
    return x


def test_quantize_rows_round_trip_is_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    x = _awkward_input((37, 48), g)
    x_fp8, scale = quantize_rows(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and scale.shape == (37, 1)
    back = dequantize_rows(x_fp8, scale)
    # e4m3 keeps 3 mantissa bits: a normal value rounds to within 2^-4 of itself; below 2^-6 of the row's range the
    # absolute step is 2^-9 of it (subnormals).
    row_max = x.abs().amax(-1, keepdim=True)
    bound = torch.maximum(x.abs() * 2.0**-4, row_max / FP8_MAX * 2.0**-9 * 64)
    assert torch.all((back - x).abs() <= bound + 1e-30)
    assert torch.all(back[2] == 0)  # the zero row stays zero (no 0/0)
    assert torch.isclose(back.abs().amax(-1), row_max.squeeze(-1), rtol=1e-6).all()  # each row's amax is exact


@pytest.mark.parametrize("shape,features", [((2, 19, 48), 80), ((53, 32), 16)])
def test_fp8_linear_matches_dequantised_reference_cpu(shape, features):
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(shape[-1], features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(features, shape[-1], generator=g))
        linear.weight[3] *= 50.0  # an outlier output channel: per-channel scales keep the others precise
        linear.bias.copy_(torch.randn(features, generator=g))
    layer = Fp8Linear.from_linear(linear.to(torch.bfloat16))
    x = _awkward_input(shape, g).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], features)
    expected = fp8_linear_reference(x, layer)
    torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=1e-3 * expected.abs().max().item())
    # and near the unquantised layer: e4m3 rounds each operand to within 2^-4 (RMS about 3.6%), so about 5% here
    assert _rel(got, linear(x)) < 0.1


def _tiny_model(dtype=torch.bfloat16, **overrides):
    fields = {k: v for k, v in TINY.items() if k != "qk_norm"}
    cfg = WanConfig(**{**fields, "gate_compress": True, **overrides})
    model = build_wan_on_meta(cfg)
    materialize_random_(model, seed=0, device=torch.device("cpu"), dtype=dtype)
    return cfg, model.eval()


def _tiny_inputs(cfg, dtype):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, cfg.in_channels, 3, 6, 10, generator=g).to(dtype)
    text = torch.randn(1, 7, cfg.text_dim, generator=g).to(dtype)
    return latents, torch.tensor([700.0]), text


def test_quantize_blocks_replaces_every_block_linear_and_stays_close():
    cfg, model = _tiny_model()
    inputs = _tiny_inputs(cfg, torch.bfloat16)
    with torch.no_grad():
        expected = model(*inputs)
    report = quantize_blocks_fp8_(model)
    # per block: attn1 q,k,v,out,gate + attn2 q,k,v,out + ffn 2
    assert report.layers == cfg.num_layers * 11 and report.kept == ()
    assert report.bytes_after < report.bytes_before * 0.6  # 1 byte a weight (+ scales, bf16 bias) instead of 2
    block = model.blocks[0]
    assert isinstance(block.attn1.to_out[0], Fp8Linear) and isinstance(block.ffn.net[0].proj, Fp8Linear)
    assert isinstance(block.attn1.to_q, Fp8Linear) and isinstance(block.attn1.to_gate_compress, Fp8Linear)
    assert isinstance(model.proj_out, nn.Linear) and isinstance(model.condition_embedder.time_proj, nn.Linear)
    with torch.no_grad():
        got = model(*inputs)
    assert got.dtype == torch.bfloat16
    assert 0 < _rel(got, expected) < 0.1, _rel(got, expected)


def test_unaligned_linears_stay_in_model_dtype():
    cfg, model = _tiny_model(attention_head_dim=12)  # dim 24: not a multiple of 16
    report = quantize_blocks_fp8_(model)
    assert report.layers == 0
    assert "blocks.0.attn1.to_q" in report.kept and "blocks.1.ffn.net.2" in report.kept


def test_quant_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model.quant='int4' is not one of none, fp8"):
        GenerateConfig(model=ModelConfig(quant="int4")).validate()
    with pytest.raises(ValueError, match=r"model.quant=fp8 computes in bfloat16.*model.dtype=bfloat16"):
        GenerateConfig(model=ModelConfig(quant="fp8", dtype="float32")).validate()
    GenerateConfig(model=ModelConfig(quant="fp8", dtype="bfloat16")).validate()
    with pytest.raises(ValueError, match=r"model.quant=fp8 needs a CUDA GPU.*device is cpu: set model.quant=none"):
        check_quant_supported("fp8", torch.device("cpu"))
    check_quant_supported("none", torch.device("cpu"))


def test_only_model_compile_compiles_the_block_stages():
    """FP8's quantisation runs inside the eager Triton kernels: no compile unless asked for."""
    from tessera.runtime.build import compiles_stages

    assert not compiles_stages(GenerateConfig(model=ModelConfig(dtype="bfloat16")))
    assert not compiles_stages(GenerateConfig(model=ModelConfig(dtype="bfloat16", quant="fp8")))
    assert compiles_stages(GenerateConfig(model=ModelConfig(dtype="bfloat16", quant="fp8", compile=True)))


def test_fp8_on_cpu_is_refused_before_weights_load(tmp_path):
    from tessera.launch import api

    with pytest.raises(ValueError, match="model.quant=fp8 needs a CUDA GPU"):
        api.load(model={"preset": "wan-tiny", "dtype": "bfloat16", "quant": "fp8"})


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,k,n", [(8353, 1536, 8960), (4097, 5120, 5120), (77, 1536, 1536)])
def test_fp8_linear_matches_dequantised_reference_gpu(tokens, k, n):
    check_quant_supported("fp8", torch.device("cuda"))
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(k, n).to("cuda", torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g).to("cuda") / k**0.5)
    layer = Fp8Linear.from_linear(linear)
    x = _awkward_input((1, tokens, k), g, "cuda").to(torch.bfloat16)
    got = layer(x)
    expected = fp8_linear_reference(x, layer)
    # fp32 reference of the same quantised operands: differences are the bf16 output rounding and the tensor
    # cores' fast accumulation
    torch.testing.assert_close(got.float(), expected, rtol=2**-6, atol=2e-3 * expected.abs().max().item())
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(x).float(), expected, rtol=2**-6, atol=2e-3 * expected.abs().max().item())


@pytest.mark.gpu
def test_fp8_model_on_gpu_close_to_bf16():
    cfg, model = _tiny_model(num_attention_heads=4, attention_head_dim=32, ffn_dim=256, text_dim=64)
    model = model.to("cuda")
    inputs = [t.to("cuda") for t in _tiny_inputs(cfg, torch.bfloat16)]
    with torch.no_grad():
        expected = model(*inputs)
        quantize_blocks_fp8_(model)
        got = model(*inputs)
    assert 0 < _rel(got, expected) < 0.1


@pytest.mark.gpu
def test_fp8_pipeline_on_gpu_close_to_bf16():
    """The whole GPU path (compiled block stages, CUDA graphs, VSA) with FP8 block linears: reported, and the final
    latents of a 4-step run near the bf16 run's."""
    import tessera

    latents = {}
    with tessera.load(model={"preset": "wan-tiny", "dtype": "bfloat16", "quant": "fp8"},
                      attention={"backend": "dense"}) as pipe:  # the compiled stages without the gate
        dense = pipe.generate(prompt="a red fox in snow", seed=3, num_steps=2)
    assert torch.isfinite(dense.latents).all()
    for quant in ("none", "fp8"):
        keys = dict(model={"preset": "wan-tiny", "dtype": "bfloat16", "quant": quant},
                    attention={"backend": "vsa", "sparsity": 0.5})
        with tessera.load(**keys) as pipe:
            video = pipe.generate(prompt="a red fox in snow", seed=3, num_steps=4)
        latents[quant] = video.latents
        if quant == "fp8":
            quant_report = video.report["weights"]["quant"]
            assert quant_report["layers"] == 4 * 11 and quant_report["kept_in_model_dtype"] == []
    assert 0 < _rel(latents["fp8"], latents["none"]) < 0.1



def _assert_rows_match_spec(got: Fp8Rows, spec_BSK: torch.Tensor) -> None:
    """``got`` is ``quantize_rows`` of the float32 values ``spec``: the same per-row scales, every value within e4m3's
    rounding of the spec value, and all but a few of the same bits. (A value a hair from an e4m3 rounding boundary
    may land on the neighbouring value: the kernels' float32 arithmetic differs from torch's in the last bits
    (reduction order, GELU through a sigmoid, the interpreter's reciprocal), and so does Triton's e4m3 cast on a GPU;
    measured 0.1-0.2% of values.)"""
    want_data, want_scale = quantize_rows(spec_BSK)
    assert got.data.dtype == torch.float8_e4m3fn and got.data.shape == spec_BSK.shape
    assert got.scale.dtype == torch.float32 and got.scale.shape == (*spec_BSK.shape[:-1], 1)
    torch.testing.assert_close(got.scale.cpu(), want_scale, rtol=1e-5, atol=0)
    back, spec = got.dequantize().cpu(), spec_BSK.float()
    row_max = spec.abs().amax(-1, keepdim=True)
    bound = torch.maximum(spec.abs() * 2.0**-4, row_max / FP8_MAX * 2.0**-9 * 64) * 1.001
    assert torch.all((back - spec).abs() <= bound + 1e-30)
    apart = (got.data.cpu().float() != want_data.float()).float().mean().item()
    assert apart < 0.01, apart


def _check_kernels(device: str = "cpu") -> None:
    """The quantising kernels against the spec on awkward rows: widths no multiple of the kernel's block, an outlier
    token and an all-zero token."""
    from tessera.models.fp8 import quantize_activation
    from tessera.models.wan.modulated_norm import add_modulated_layer_norm_, modulated_layer_norm

    gen = torch.Generator().manual_seed(11)
    for shape in ((2, 19, 48), (3, 200), (1, 5, 1000), (2, 3, 1536)):
        x = _awkward_input(shape, gen).to(device=device, dtype=torch.bfloat16)
        got = quantize_activation(x, fused=True)
        _assert_rows_match_spec(got, x.float().cpu())
        got = quantize_activation(x, fused=True, gelu=True)
        _assert_rows_match_spec(got, torch.nn.functional.gelu(x.float().cpu(), approximate="tanh"))
        assert got.data.shape == x.shape
    for batch, seq_len, width in ((2, 37, 48), (1, 9, 1536)):
        x = (torch.randn(batch, seq_len, width, generator=gen) * 3 + 1.5).to(device=device, dtype=torch.bfloat16)
        a = (1 + 0.5 * torch.randn(batch, 1, width, generator=gen)).to(device)
        b = torch.randn(batch, 1, width, generator=gen).to(device)
        spec = torch.nn.functional.layer_norm(x.float(), (width,), eps=1e-6) * a + b
        _assert_rows_match_spec(modulated_layer_norm(x, a, b, 1e-6, fused=True, fp8=True), spec.cpu())
        composite = modulated_layer_norm(x, a, b, 1e-6, fused=False, fp8=True)  # the CPU path: the spec itself,
        want_data, want_scale = quantize_rows(spec)  # quantised from float32, not from a bf16 rounding
        assert torch.equal(composite.data, want_data) and torch.equal(composite.scale, want_scale)
        residual = torch.randn(batch, seq_len, width, generator=gen).to(device=device, dtype=torch.bfloat16)
        got_sum, expected_sum = x.clone(), x.clone()
        got = add_modulated_layer_norm_(got_sum, residual, a, b, 1e-6, fused=True, fp8=True)
        add_modulated_layer_norm_(expected_sum, residual, a, b, 1e-6, fused=False)
        assert torch.equal(got_sum, expected_sum) if device == "cuda" else not torch.equal(got_sum, x)
        spec = torch.nn.functional.layer_norm(got_sum.float(), (width,), eps=1e-6) * a + b
        _assert_rows_match_spec(got, spec.cpu())


def _check_fused_model() -> None:
    """The quantised DiT's forward with the fused kernels (the LayerNorms writing e4m3, GELU + quantise in one
    kernel) against its composite forward, and near the unquantised model."""
    cfg, model = _tiny_model()
    inputs = _tiny_inputs(cfg, torch.bfloat16)
    with torch.no_grad():
        unquantised = model(*inputs)
        quantize_blocks_fp8_(model)
        composite = model(*inputs)
        model._fused_ops = True  # what use_fast_stages(compile=False) sets on CUDA
        fused = model(*inputs)
        # model.compile=true: the quantising custom ops (tuple outputs, one mutating x) inside compiled stages
        model._block_stages = tuple(torch.compile(stage, dynamic=False) for stage in model._block_stages)
        compiled = model(*inputs)
    # (the interpreter truncates float32 -> bfloat16 where the GPU rounds: the fused path drifts further here)
    assert _rel(fused, composite) < 2e-2, _rel(fused, composite)
    assert 0 < _rel(fused, unquantised) < 0.1, _rel(fused, unquantised)
    assert _rel(compiled, fused) < 1e-2, _rel(compiled, fused)
    _check_per_token_modulation()


def _check_per_token_modulation() -> None:
    """A quantised block under a per-token modulation (Wan2.2 TI2V from an image: the first frame's tokens at t=0):
    the norms take the composite path, still handing the FP8 GEMMs e4m3 rows; fused and composite agree, and the
    clean tokens really get the other modulation."""
    from tessera.models.wan.transformer import TokenModulation

    cfg, model = _tiny_model()
    block = model.blocks[0]
    quantize_blocks_fp8_(model)
    g = torch.Generator().manual_seed(12)
    seq_len = 23
    x = torch.randn(1, seq_len, cfg.dim, generator=g).to(torch.bfloat16)
    text = torch.randn(1, 7, cfg.dim, generator=g).to(torch.bfloat16)
    noisy, clean = (torch.randn(1, 6, cfg.dim, generator=g) for _ in range(2))
    per_token = TokenModulation(noisy, clean, (torch.arange(seq_len) < 5)[:, None])
    with torch.no_grad():
        outs = [block.text_and_ffn(x.clone(), text, modulation, fused=fused)
                for modulation, fused in ((per_token, True), (per_token, False), (noisy, False))]
    assert _rel(outs[0], outs[1]) < 2e-2, _rel(outs[0], outs[1])
    assert _rel(outs[1][:, 5:], outs[2][:, 5:]) < 1e-6 and _rel(outs[1][:, :5], outs[2][:, :5]) > 1e-2


@pytest.mark.parametrize("what", ["kernels", "model"])
def test_interpreted_quantising_kernels_match_spec(run_triton_interpreted, what: str) -> None:
    proc = run_triton_interpreted(__file__, what)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.gpu
def test_gpu_quantising_kernels_match_spec() -> None:
    _check_kernels("cuda")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    {"kernels": _check_kernels, "model": _check_fused_model}[sys.argv[1]]()
    print("ok")
