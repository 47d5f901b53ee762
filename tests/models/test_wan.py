"""models.wan against diffusers' WanTransformer3DModel, and the token-order / context contract."""

import gc
import weakref

import pytest
import torch
from _tiny import TINY  # tests/models is on sys.path under pytest (no __init__.py)
from diffusers import WanTransformer3DModel
from tessera.attention.dense import DenseAttention
from tessera.models.family import ForwardContext
from tessera.models.wan import (
    WanConfig,
    WanTransformer,
    build_wan_on_meta,
    materialize_random_,
    wan_param_dtype,
)


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """O(1)-scale random weights (larger than materialize_random_'s) so every path moves the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "to_gate_compress" in name:
                p.zero_()
            elif p.ndim >= 2 and "scale_shift_table" not in name:
                p.copy_(r / p[0].numel() ** 0.5)
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.2 * r)


def _pair(gate_compress: bool = False, dtype=torch.float32):
    ours = materialize_random_(
        build_wan_on_meta(WanConfig(**TINY, gate_compress=gate_compress)), 0, "cpu", torch.float32
    )
    _randomize_(ours, 1)
    ref = WanTransformer3DModel(**TINY)
    state = {k: v for k, v in ours.state_dict().items() if "to_gate_compress" not in k}
    ref.load_state_dict(state, strict=True)
    if dtype != torch.float32:
        for model in (ours, ref):
            for name, p in model.named_parameters():
                p.data = p.data.to(wan_param_dtype(name, dtype))
    return ours.eval(), ref.eval()


def _inputs(batch=2, frames=3, height=6, width=10, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, generator=gen)
    t = torch.tensor([999.0, 321.5])[:batch]
    text = torch.randn(batch, 7, 24, generator=gen)
    return x, t, text


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


class _BSND:
    """Test adapter: single-device [B, N, S, D] backend -> model's [B, S, N, D] protocol."""

    def __init__(self, uses_gate=False):
        self.uses_gate = uses_gate
        self.gates = []

    def __call__(self, q, k, v, gate):
        self.gates.append(gate)
        out = DenseAttention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return out if gate is None else out + gate


@pytest.mark.parametrize("gate_compress", [False, True])
def test_matches_diffusers_fp32(gate_compress):
    ours, ref = _pair(gate_compress)
    x, t, text = _inputs()
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text)
    assert got.shape == expected.shape == (2, 4, 3, 6, 10)
    assert _rel(got, expected) <= 1e-5
    # The two batch entries differ (different timesteps and inputs), so the check is not vacuous.
    assert _rel(got[0], got[1]) > 1e-2


def test_matches_diffusers_bf16_with_fp32_modules():
    ours, ref = _pair(dtype=torch.bfloat16)
    assert ours.scale_shift_table.dtype == torch.float32
    assert ours.blocks[0].norm2.weight.dtype == torch.float32
    assert ours.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    x, t, text = _inputs()
    with torch.no_grad():
        expected = ref(x.bfloat16(), t, text.bfloat16(), return_dict=False)[0]
        got = ours(x, t, text)
    assert got.dtype == torch.bfloat16
    assert _rel(got, expected) <= 1e-3  # bitwise equal on CPU today


def test_config_from_diffusers_and_rope_split():
    ref = WanTransformer3DModel(**TINY)
    cfg = WanConfig.from_diffusers_config(dict(ref.config))
    assert cfg == WanConfig(**TINY)
    assert WanConfig(
        num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30
    ).rope_dims == (44, 42, 42)
    assert cfg.rope_dims == (ref.rope.t_dim, ref.rope.h_dim, ref.rope.w_dim)
    i2v = WanConfig.from_diffusers_config({**TINY, "in_channels": 36, "out_channels": 16, "image_dim": 1280,
                                           "added_kv_proj_dim": cfg.dim})
    assert (i2v.image_dim, i2v.condition_channels, i2v.takes_image) == (1280, 20, True) and not cfg.takes_image
    with pytest.raises(ValueError, match="pos_embed_seq_len"):  # Wan2.1 FLF2V: not implemented
        WanConfig.from_diffusers_config({**TINY, "image_dim": 1280, "pos_embed_seq_len": 514})
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        WanConfig(**{**TINY, "image_dim": 1280, "added_kv_proj_dim": cfg.dim + 1})
    with pytest.raises(ValueError, match="attention_head_dim"):
        WanConfig(**{**TINY, "attention_head_dim": 15})
    with pytest.raises(ValueError, match="num_layers"):
        WanConfig(**{**TINY, "num_layers": 0})


def test_rope_tables_match_diffusers():
    ours, ref = _pair()
    cos, sin = ours.rope_tables((3, 3, 5), "cpu")
    ref_cos, ref_sin = ref.rope(torch.zeros(1, 4, 3, 6, 10))
    assert cos.shape == (45, 8)
    torch.testing.assert_close(cos, ref_cos[0, :, 0, 0::2], rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin[0, :, 0, 1::2], rtol=0, atol=0)


def test_permuted_token_order_equals_raster():
    ours, _ = _pair()
    x, t, text = _inputs()
    grid = ours.grid_thw(x.shape[2:])
    cos, sin = ours.rope_tables(grid, "cpu")
    order = torch.randperm(cos.shape[0], generator=torch.Generator().manual_seed(3))
    ctx = ForwardContext(
        rope=(cos[order], sin[order]),
        attn=[_BSND()] * 2,
        token_order=order,
        token_order_inverse=order.argsort(),
    )
    with torch.no_grad():
        expected = ours(x, t, text)
        got = ours(x, t, text, ctx=ctx)
        # Control: a wrong rope permutation must break the equality.
        bad = ForwardContext(
            rope=(cos, sin), attn=ctx.attn, token_order=order, token_order_inverse=order.argsort()
        )
        wrong = ours(x, t, text, ctx=bad)
    assert _rel(got, expected) <= 1e-5
    assert _rel(wrong, expected) > 1e-3


def test_clean_first_frame_matches_diffusers_per_token_timesteps():
    """ctx.clean_tokens (TI2V from an image) equals diffusers' 2-D timestep (mask * t per token: the first latent
    frame's tokens at 0), in raster order and in a permuted order; without it the model is the scalar-t one."""
    ours, ref = _pair()
    x, t, text = _inputs()
    grid = ours.grid_thw(x.shape[2:])
    cos, sin = ours.rope_tables(grid, "cpu")
    clean_S1 = ours.first_frame_tokens(grid, "cpu")
    assert clean_S1.shape == (cos.shape[0], 1) and clean_S1.sum() == grid[1] * grid[2]
    per_token_BS = torch.where(clean_S1[:, 0], 0.0, t[:, None])  # diffusers: (mask[:, ::2, ::2] * t).flatten()
    order = torch.randperm(cos.shape[0], generator=torch.Generator().manual_seed(4))
    raster = ForwardContext(rope=(cos, sin), attn=[_BSND()] * 2, clean_tokens=clean_S1)
    permuted = ForwardContext(rope=(cos[order], sin[order]), attn=[_BSND()] * 2, token_order=order,
                                 token_order_inverse=order.argsort(), clean_tokens=clean_S1[order])
    with torch.no_grad():
        expected = ref(x, per_token_BS, text, return_dict=False)[0]
        got, got_permuted = ours(x, t, text, ctx=raster), ours(x, t, text, ctx=permuted)
        scalar = ours(x, t, text)
    assert _rel(got, expected) <= 1e-5 and _rel(got_permuted, expected) <= 1e-5
    assert _rel(scalar, expected) > 1e-3  # the clean frame changes the output: the check is not vacuous


def test_gate_passed_only_when_backend_uses_it():
    ours, _ = _pair(gate_compress=True)
    x, t, text = _inputs()
    rope = ours.rope_tables(ours.grid_thw(x.shape[2:]), "cpu")
    with torch.no_grad():
        expected = ours(x, t, text)
        plain, gated = _BSND(), _BSND(uses_gate=True)
        out_plain = ours(x, t, text, ctx=ForwardContext(rope=rope, attn=[plain] * 2))
        out_zero_gate = ours(x, t, text, ctx=ForwardContext(rope=rope, attn=[gated] * 2))
        assert all(g is None for g in plain.gates)
        assert len(gated.gates) == 2 and all(g.shape == (2, 45, 2, 16) for g in gated.gates)
        assert _rel(out_plain, expected) <= 1e-5 and _rel(out_zero_gate, expected) <= 1e-5
        for block in ours.blocks:
            torch.nn.init.normal_(block.attn1.to_gate_compress.weight)
        out_gate = ours(x, t, text, ctx=ForwardContext(rope=rope, attn=[_BSND(uses_gate=True)] * 2))
    assert _rel(out_gate, expected) > 1e-3


class _LivenessProbe(_BSND):
    """Records, at each call, how many of the previous call's q, k, v, gate and output tensors are still alive."""

    def __init__(self):
        super().__init__(uses_gate=True)
        self.previous, self.alive = [], []

    def __call__(self, q, k, v, gate):
        self.alive.append(sum(ref() is not None for ref in self.previous))
        out = super().__call__(q, k, v, gate)
        self.gates.clear()
        self.previous = [weakref.ref(t) for t in (q, k, v, gate, out)]
        return out


@pytest.mark.parametrize("compiled", [False, True])
def test_attention_tensors_are_freed_before_the_next_block(compiled, monkeypatch):
    """The forward keeps no name on q, k, v, the gate or the attention output: a block's five [B, S, N, D]
    tensors are gone before its FFN runs and before the next block projects its own (else they raise the
    peak memory). Inside the FFN (the memory peak), the normalised input is gone before the down projection and
    the wide activation before the residual, and the block's hidden states live in one buffer."""
    from tessera.models.wan import transformer

    ours, _ = _pair(gate_compress=True)
    if compiled:
        ours.use_fast_stages(compile=True)
    x, t, text = _inputs()
    rope = ours.rope_tables(ours.grid_thw(x.shape[2:]), "cpu")
    probe = _LivenessProbe()
    alive_at_ffn, ffn_inputs, ffn_input_alive, hidden_alive, residuals = [], [], [], [], []
    if not compiled:  # eager: hooks see the FFN's GEMMs
        def at_up_projection(module, args):
            alive_at_ffn.append(sum(ref() is not None for ref in probe.previous))
            ffn_inputs[:] = [weakref.ref(args[0])]

        def at_down_projection(module, args):
            ffn_input_alive.append(ffn_inputs[0]() is not None)
            ffn_inputs[:] = [weakref.ref(args[0])]  # the wide activation
            hidden_shape = (args[0].shape[0], args[0].shape[1], ours.config.dim)
            residuals.append(len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                                  if isinstance(t, torch.Tensor) and t.shape == hidden_shape}))

        def residual(x_BSC, y_BSC, gate, fused):
            hidden_alive.append(ffn_inputs[0]() is not None if ffn_inputs else None)
            return gated_residual(x_BSC, y_BSC, gate, fused)

        gated_residual = transformer.gated_residual
        monkeypatch.setattr(transformer, "gated_residual", residual)
        for block in ours.blocks:
            block.ffn.net[0].proj.register_forward_pre_hook(at_up_projection)
            block.ffn.net[2].register_forward_pre_hook(at_down_projection)
    with torch.no_grad():
        ours(x, t, text, ctx=ForwardContext(rope=rope, attn=[probe] * 2))
    assert probe.alive == [0, 0]
    assert alive_at_ffn == ([] if compiled else [0, 0])  # not even the attention output
    assert ffn_input_alive == ([] if compiled else [False, False])
    assert hidden_alive == ([] if compiled else [None, False, False, False])  # attention's, FFN's residual per block
    assert residuals == ([] if compiled else [1, 1])  # one [B, S, C] buffer: the cross-attention residual in place


def test_materialize_random_is_deterministic_and_order_independent():
    cfg = WanConfig(**TINY, gate_compress=True)
    a = materialize_random_(build_wan_on_meta(cfg), 7, "cpu", torch.bfloat16)
    b = build_wan_on_meta(cfg)
    b.blocks = torch.nn.ModuleList(list(b.blocks))  # same names, construction unchanged
    b = materialize_random_(b, 7, "cpu", torch.bfloat16)
    c = materialize_random_(build_wan_on_meta(cfg), 8, "cpu", torch.bfloat16)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.device.type == "cpu" and pa.dtype == wan_param_dtype(name, torch.bfloat16)
        assert torch.equal(pa, pb)
    assert not torch.equal(a.blocks[0].attn1.to_q.weight, c.blocks[0].attn1.to_q.weight)
    # Same tensor name -> same values whatever other parameters exist (per-name generators).
    small = materialize_random_(
        build_wan_on_meta(WanConfig(**{**TINY, "num_layers": 1})), 7, "cpu", torch.bfloat16
    )
    assert torch.equal(small.blocks[0].ffn.net[2].weight, a.blocks[0].ffn.net[2].weight)
    assert a.blocks[1].attn1.to_gate_compress.weight.abs().max() == 0
    assert isinstance(a, WanTransformer)


@pytest.mark.slow
def test_compiled_block_stages_match_eager():
    """use_fast_stages(compile=True) (used on GPUs) fuses the token-local stages without changing the math."""
    torch.manual_seed(3)
    cfg = WanConfig(num_attention_heads=2, attention_head_dim=16, ffn_dim=48, num_layers=3, text_dim=24,
                    freq_dim=32, gate_compress=True)
    model = materialize_random_(build_wan_on_meta(cfg), seed=5, device="cpu", dtype=torch.float32)
    latents = torch.randn(1, 16, 3, 6, 10)
    timestep = torch.tensor([321.0])
    text = torch.randn(1, 7, 24)
    other = torch.randn(1, 16, 2, 4, 6)  # a second video shape
    eager, eager_other = model(latents, timestep, text), model(other, timestep, text)
    torch._dynamo.reset()  # earlier tests compiled the same stage functions (caches are per code object)
    model.use_fast_stages(compile=True)
    # Each stage is its own code object with its own dynamo cache: with a limit of 2 graphs per code object,
    # two video shapes compile (a cache shared by the three stages holds 3 graphs after one shape and would
    # fail here, where by default it silently falls back to eager).
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        compiled, compiled_other = model(latents, timestep, text), model(other, timestep, text)
    assert ((compiled - eager).norm() / eager.norm()).item() < 1e-5
    assert ((compiled_other - eager_other).norm() / eager_other.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_linear_gelu_matches_the_composite(dtype: torch.dtype) -> None:
    """The FFN's cuBLASLt GEMM + bias + GELU(tanh) epilogue against the fp32 composite, eager and compiled, on
    awkward shapes (a 3D input, sizes no tile divides)."""
    from tessera.models.wan.transformer import linear_gelu_tanh

    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(200, 333).to(dtype).cuda()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(333, 200, generator=gen) / 200**0.5)
        linear.bias.copy_(torch.randn(333, generator=gen))
    x = torch.randn(3, 77, 200, generator=gen).to(dtype).cuda()
    expected = torch.nn.functional.gelu(
        torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double()), approximate="tanh")
    with torch.no_grad():  # inference: the fused op
        for fn in (linear_gelu_tanh, torch.compile(linear_gelu_tanh, fullgraph=True)):
            got = fn(x, linear)
            assert got.shape == (3, 77, 333) and got.dtype == dtype
            err = ((got.double() - expected).norm() / expected.norm()).item()
            assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err  # fp32: the erf GELU would miss
    linear_gelu_tanh(x, linear).sum().backward()  # with autograd: the composite, which has a backward
    assert linear.weight.grad is not None
