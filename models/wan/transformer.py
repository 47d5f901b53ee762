"""Wan2.1 text- and image-to-video DiT, numerically matching diffusers' ``WanTransformer3DModel``.

Parameter names follow the diffusers layout, so its state dicts load strictly. The attention kernel,
the token order and the sequence shard/gather are injected per request through ``ForwardContext``;
the model itself never communicates. Reference numbers (presets live in ``configs/models/*.yaml``):
  Wan2.1-T2V-1.3B: 12 heads x 128 (dim 1536), 30 layers, ffn_dim 8960, text_dim 4096, freq_dim 256.
  Wan2.1-T2V-14B:  40 heads x 128 (dim 5120), 40 layers, ffn_dim 13824, text_dim 4096, freq_dim 256.
  Wan2.1-I2V-14B:  as T2V-14B with in_channels 36 (16 noisy + 4 mask + 16 first-frame latents), image_dim 1280
                   (CLIP ViT-H/14 penultimate states, 257 tokens) and added_kv_proj_dim 5120 (the image branch).

Legend: B batch, C channels, F latent frames, H/W latent height/width, S video tokens, L text tokens,
N heads, D head dim, I image tokens, E the FFN width; ``local_*`` is this rank's contiguous shard of the token sequence.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tessera.attention.dense import DenseAttention
from tessera.attention.vsa import on_device
from tessera.models.family import ForwardContext, SelfAttention
from tessera.models.fp8 import Fp8Rows, quantize_activation, takes_fp8
from tessera.models.wan.config import WanConfig, wan_param_dtype
from tessera.models.wan.modulated_norm import add_modulated_layer_norm_, gated_residual, modulated_layer_norm
from tessera.models.wan.qk_norm_rope import qk_norm_rope

# --------------------------------------------------------------------------------------------------
# Injected per-request context
# --------------------------------------------------------------------------------------------------


class _LocalSelfAttention:
    """Adapts a one-device [B, N, S, D] backend (e.g. ``attention.DenseAttention``) to ``SelfAttention``."""

    def __init__(self, backend: Callable[..., torch.Tensor], uses_gate: bool = False) -> None:
        self.backend = backend
        self.uses_gate = uses_gate

    def __call__(self, q_BSND, k_BSND, v_BSND, gate_BSND):
        gate_BNSD = None if gate_BSND is None else gate_BSND.transpose(1, 2)
        out_BNSD = self.backend(
            q_BSND.transpose(1, 2), k_BSND.transpose(1, 2), v_BSND.transpose(1, 2), gate_BNSD
        )
        return out_BNSD.transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class _FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returned in the input dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def timestep_embedding(timestep_B: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, freq_dim] fp32, cos half first (diffusers Timesteps, flip_sin_to_cos)."""
    half = freq_dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep_B.device) / half
    angle_BC = timestep_B[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angle_BC), torch.sin(angle_BC)], dim=-1)


class _TimestepEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TextEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class _ImageEmbedder(nn.Module):
    """diffusers ``WanImageEmbedding``: FP32 LayerNorm -> Linear -> GELU (exact) -> Linear -> FP32 LayerNorm
    (both norms affine, eps 1e-5: diffusers' FP32LayerNorm defaults). ``ff`` keeps FeedForward's names."""

    def __init__(self, image_dim: int, dim: int) -> None:
        super().__init__()
        self.norm1 = _FP32LayerNorm(image_dim)
        proj = nn.Module()
        proj.proj = nn.Linear(image_dim, image_dim)  # FeedForward(mult=1): the hidden width is image_dim
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(image_dim, dim)])
        self.norm2 = _FP32LayerNorm(dim)

    def forward(self, image_BIC: torch.Tensor) -> torch.Tensor:
        """CLIP states [B, I, image_dim] -> image tokens [B, I, dim] in the input dtype."""
        net = self.ff.net
        return self.norm2(net[2](F.gelu(net[0].proj(self.norm1(image_BIC)))))


class _ConditionEmbedder(nn.Module):
    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.freq_dim = config.freq_dim
        self.time_embedder = _TimestepEmbedder(config.freq_dim, config.dim)
        self.time_proj = nn.Linear(config.dim, 6 * config.dim)
        self.text_embedder = _TextEmbedder(config.text_dim, config.dim)
        self.image_embedder = None if config.image_dim is None else _ImageEmbedder(config.image_dim, config.dim)

    def time(self, timestep_B: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> temb [B, C] in ``dtype``, modulation [B, 6, C]."""
        freqs = timestep_embedding(timestep_B, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb_BC = self.time_embedder(freqs).to(dtype)
        return temb_BC, self.time_proj(F.silu(temb_BC)).unflatten(1, (6, -1))

    def forward(self, timestep_B: torch.Tensor, text_BLC: torch.Tensor):
        """-> temb [B, C], modulation [B, 6, C], text [B, L, C]."""
        return *self.time(timestep_B, text_BLC.dtype), self.text_embedder(text_BLC)


class TokenModulation(NamedTuple):
    """The modulation of a forward whose tokens have one of two timesteps (Wan2.2 TI2V started from an image: the
    first latent frame's tokens at t = 0, the others at the step's t), given as the two rows and a per-token selector
    instead of diffusers' [B, S, 6, C] (one row per token): noisy/clean [B, 6, C] from the step's timestep and from 0,
    clean_S1 bool [S_local, 1] (True: the clean row). The blocks select per token where they apply it."""

    noisy_B6C: torch.Tensor
    clean_B6C: torch.Tensor
    clean_S1: torch.Tensor

    def select(self, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Per token the clean or noisy one of two [B, 1, C] rows -> [B, S_local, C]."""
        return torch.where(self.clean_S1, clean, noisy)


@torch.library.custom_op("tessera::linear_gelu_tanh", mutates_args=())
def _linear_gelu_tanh_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)(x @ weight^T + bias) as one cuBLASLt GEMM with the bias + GELU epilogue: the FFN's wide
    activation is written once, not written, read and written again by a separate GELU kernel. CUDA only (the
    CPU build of ``_addmm_activation`` applies the exact GELU). An opaque op, so torch.compile keeps it whole."""
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@_linear_gelu_tanh_cuda.register_fake
def _linear_gelu_tanh_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_gelu_tanh(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """GELU(tanh)(linear(x)): the fused cuBLASLt epilogue on CUDA without autograd (inference), else the
    composite (the fused op has no backward)."""
    if x.is_cuda and not torch.is_grad_enabled() and linear.bias is not None and x.dtype == linear.weight.dtype:
        return _linear_gelu_tanh_cuda(x, linear.weight, linear.bias)
    return F.gelu(linear(x), approximate="tanh")


class _FeedForward(nn.Module):
    """diffusers FeedForward(activation_fn="gelu-approximate")'s parameters: ``net.0.proj`` -> GELU(tanh) -> ``net.2``
    (``WanBlock.text_and_ffn`` runs them, freeing each input as it goes)."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, ffn_dim)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(ffn_dim, dim)])


class WanAttention(nn.Module):
    """Projections of one attention layer (diffusers ``WanAttention`` names); q/k RMSNorm over all heads."""

    def __init__(
        self, config: WanConfig, gate_compress: bool = False, sla_proj_l: bool = False,
        added_kv_proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_attention_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=config.eps)
        self.norm_k = nn.RMSNorm(dim, eps=config.eps)
        # I2V cross-attention: keys/values of the image tokens (diffusers' added-KV names); None for text-only.
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=config.eps)
        self.to_gate_compress = nn.Linear(dim, dim) if gate_compress else None
        # SLA's linear-branch projection, one per layer, shared by all heads (the backend applies it per head).
        head_dim = config.attention_head_dim
        self.proj_l = nn.Linear(head_dim, head_dim) if sla_proj_l else None

    def self_attention_inputs(
        self,
        x_BSC: torch.Tensor | Fp8Rows,
        rope: tuple[torch.Tensor, torch.Tensor],
        with_gate: bool,
        fused: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, k (RMSNorm over all heads, then RoPE), v and the VSA gate (when asked and present): [B,S,N,D].
        ``x_BSC`` is ``Fp8Rows`` when the projections are FP8 (quantised once for all of them).

        ``fused``: norm + RoPE of q and k in one Triton launch (``models.qk_norm_rope``), else the composite.
        """
        heads = (self.num_heads, -1)
        q_BSND, k_BSND = qk_norm_rope(
            self.to_q(x_BSC), self.to_k(x_BSC), self.norm_q.weight, self.norm_k.weight, self.norm_q.eps,
            *rope, self.num_heads, fused,
        )
        v_BSND = self.to_v(x_BSC).unflatten(2, heads)
        gate_BSND = None
        if with_gate and self.to_gate_compress is not None:
            gate_BSND = self.to_gate_compress(x_BSC).unflatten(2, heads)
        return q_BSND, k_BSND, v_BSND, gate_BSND

    def cross_attention(
        self, x_BSC: torch.Tensor | Fp8Rows, text_BLC: torch.Tensor, image_BIC: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of the video tokens (``Fp8Rows`` for an FP8 ``to_q``) to the text tokens [B, L, C] and, for
        I2V, separately to the image tokens [B, I, C] (keys add_k_proj -> RMSNorm, values add_v_proj); the two
        outputs are summed before ``to_out``, as diffusers' WanAttnProcessor does. No RoPE, no mask."""
        heads = (self.num_heads, -1)
        q_BNSD = self.norm_q(self.to_q(x_BSC)).unflatten(2, heads).transpose(1, 2)
        k_BNLD = self.norm_k(self.to_k(text_BLC)).unflatten(2, heads).transpose(1, 2)
        v_BNLD = self.to_v(text_BLC).unflatten(2, heads).transpose(1, 2)
        out_BSC = F.scaled_dot_product_attention(q_BNSD, k_BNLD, v_BNLD).transpose(1, 2).flatten(2).type_as(q_BNSD)
        if image_BIC is not None:
            k_BNID = self.norm_added_k(self.add_k_proj(image_BIC)).unflatten(2, heads).transpose(1, 2)
            v_BNID = self.add_v_proj(image_BIC).unflatten(2, heads).transpose(1, 2)
            out_img_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNID, v_BNID)
            out_BSC = out_BSC + out_img_BNSD.transpose(1, 2).flatten(2).type_as(q_BNSD)
        return self.to_out[0](out_BSC)


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention to text, modulated FFN."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        dim = config.dim
        self.norm1 = _FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.attn1 = WanAttention(config, gate_compress=config.gate_compress, sla_proj_l=config.sla_proj_l)
        self.norm2 = (
            _FP32LayerNorm(dim, config.eps, elementwise_affine=True) if config.cross_attn_norm else None
        )
        self.attn2 = WanAttention(config, added_kv_proj_dim=config.added_kv_proj_dim)
        self.norm3 = _FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.ffn = _FeedForward(dim, config.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def _modulation(
        self, modulation: torch.Tensor | TokenModulation, first: int, stop: int
    ) -> tuple[torch.Tensor, ...]:
        """Entries ``first:stop`` of shift, scale, gate, c_shift, c_scale, c_gate, fp32 (modulation math in fp32):
        each [B, 1, C] from a [B, 6, C] modulation, or [B, S_local, C] per token from a ``TokenModulation``."""
        if not isinstance(modulation, TokenModulation):
            return (self.scale_shift_table + modulation.float()).chunk(6, 1)[first:stop]
        noisy = (self.scale_shift_table + modulation.noisy_B6C.float()).chunk(6, 1)[first:stop]
        clean = (self.scale_shift_table + modulation.clean_B6C.float()).chunk(6, 1)[first:stop]
        return tuple(modulation.select(n, c) for n, c in zip(noisy, clean, strict=True))

    def attention_inputs(
        self,
        x_BSC: torch.Tensor,
        modulation_B6C: torch.Tensor | TokenModulation,
        rope: tuple[torch.Tensor, torch.Tensor],
        with_gate: bool,
        fused: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stage 1a (token-local): modulated norm -> q, k (RMSNorm, RoPE), v, optional VSA gate [B,S,N,D].
        ``fused``: the Triton ops for the modulated norm and q/k norm + RoPE, else the composites (the norm's always
        for a per-token ``TokenModulation``: the kernel takes one modulation row per batch row)."""
        shift, scale = self._modulation(modulation_B6C, 0, 2)
        per_token = isinstance(modulation_B6C, TokenModulation)
        attn = self.attn1
        # FP8 projections (model.quant=fp8): the norm writes their e4m3 input once, for all of them
        fp8 = takes_fp8(attn.to_q, attn.to_k, attn.to_v, attn.to_gate_compress if with_gate else None)
        h_BSC = modulated_layer_norm(x_BSC, 1 + scale, shift, self.norm1.eps, fused and not per_token, fp8)
        return attn.self_attention_inputs(h_BSC, rope, with_gate, fused)

    def attention_residual(
        self, x_BSC: torch.Tensor, out_BSND: torch.Tensor, modulation_B6C: torch.Tensor | TokenModulation,
        fused: bool = False,
    ) -> torch.Tensor:
        """Stage 1b (token-local): out-projection + gated residual. Its own stage, so that the attention output
        and the block's input are freed before the FFN (the forward's memory peak). ``fused``: the Triton op for
        the gated residual, else the composite."""
        (gate,) = self._modulation(modulation_B6C, 2, 3)
        return gated_residual(x_BSC, self.attn1.to_out[0](out_BSND.flatten(2).type_as(x_BSC)), gate, fused)

    def text_and_ffn(
        self, x_BSC: torch.Tensor, text_BLC: torch.Tensor, modulation_B6C: torch.Tensor | TokenModulation,
        fused: bool = False, image_BIC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stages 2-3 (token-local): cross-attention to the (unsharded) text tokens and, for I2V, image tokens, no
        RoPE, no mask; then the modulated FFN. ``fused``: the Triton op for the two norms, else the composites (the
        modulated norm's always for a per-token ``TokenModulation``). ``x_BSC`` takes the cross-attention residual
        in place; the returned hidden states (after the FFN's residual) are a new tensor."""
        c_shift, c_scale, c_gate = self._modulation(modulation_B6C, 3, 6)
        up, down = self.ffn.net[0].proj, self.ffn.net[2]
        fp8_ffn = takes_fp8(up, down)  # norm3 writes e4m3 for the up projection; GELU quantises for the down one
        h_BSC = x_BSC
        if self.norm2 is not None:  # (an FP8 q projection: the norm writes its e4m3 input)
            fp8_q = takes_fp8(self.attn2.to_q)
            h_BSC = (modulated_layer_norm(x_BSC, self.norm2.weight, self.norm2.bias, self.norm2.eps, fused, fp8_q)
                     if fused or fp8_q else self.norm2(x_BSC.float()).type_as(x_BSC))
        h_BSC = add_modulated_layer_norm_(  # x_BSC += the cross-attention output, in place
            x_BSC, self.attn2.cross_attention(h_BSC, text_BLC, image_BIC), 1 + c_scale, c_shift, self.norm3.eps,
            fused and not isinstance(modulation_B6C, TokenModulation), fp8_ffn)
        # The FFN is the forward's memory peak: one residual buffer (the add above is in place), and each input is
        # dropped as soon as its consumer has run, so neither the normalised input lives through the down projection
        # nor the wide activation through the residual.
        if fp8_ffn:  # GELU and the down projection's quantisation in one pass over the wide activation
            hidden_BSE = quantize_activation(up(h_BSC), fused, gelu=True)
        else:
            hidden_BSE = linear_gelu_tanh(h_BSC, up)
        del h_BSC
        y_BSC = down(hidden_BSE)
        del hidden_BSE
        return gated_residual(x_BSC, y_BSC, c_gate, fused)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class WanTransformer(nn.Module):
    """Wan2.1 DiT. ``forward(latents [B, C_in, F, H, W], timestep [B], text [B, L, text_dim], image)``; ``image``
    [B, I, image_dim] (CLIP states) for I2V models (``config.image_dim`` set), else None."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, config.patch_size, stride=config.patch_size)
        self.condition_embedder = _ConditionEmbedder(config)
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.norm_out = _FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self._dense = _LocalSelfAttention(DenseAttention())
        self._block_stages = (WanBlock.attention_inputs, WanBlock.attention_residual, WanBlock.text_and_ffn)
        self._fused_ops = False  # use_fast_stages sets it on CUDA

    def use_fast_stages(self, compile: bool) -> None:
        """The token-local block stages' fast path. On CUDA their elementwise work runs as Triton ops: q/k RMSNorm
        + RoPE as one (``tessera::qk_norm_rope``), each LayerNorm with its modulation or affine as another
        (``tessera::modulated_layer_norm``, the cross-attention residual add inside norm3's), each gated residual
        as a third (``tessera::gated_residual``); with the GEMMs (the FFN's GELU in cuBLASLt's epilogue) that is
        every op of a block, so eager stages run about as fast as compiled ones and start without compiling.
        ``compile``: also torch.compile the stages (the small modulation math fuses; costs seconds on the first
        forward of each shape, a cache hit less). Call after the weights are on their device.

        The attention call between the stages stays eager (collectives, custom kernels). Blocks share parameters'
        shapes, so one graph per stage serves all blocks (dynamo treats module parameters as inputs).
        """
        self._fused_ops = next(self.parameters()).device.type == "cuda"  # the Triton norm kernels
        self._block_stages = (WanBlock.attention_inputs, WanBlock.attention_residual, WanBlock.text_and_ffn)
        if not compile:
            return
        # The functions themselves, not wrappers: dynamo caches compiled graphs per code object, up to its
        # recompile limit (8), and functools.partial objects all share one wrapper's code. Shared, three stages
        # x (gate or not) x a few video shapes hit the limit and fell back to eager (seen at sp 8 on a GPU).
        stages = (WanBlock.attention_inputs, WanBlock.attention_residual, WanBlock.text_and_ffn)
        self._block_stages = tuple(torch.compile(fn, dynamic=False) for fn in stages)

    def grid_thw(self, latent_shape_FHW: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (T, Hh, Ww) after patchify for latent (F, H, W)."""
        f, h, w = latent_shape_FHW
        p_t, p_h, p_w = self.config.patch_size
        return f // p_t, h // p_h, w // p_w

    def rope_tables(
        self, grid_thw: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin), each [S, D/2] in raster token order; entry i rotates head-dim pair (2i, 2i+1).

        Angles as diffusers: float64 ``pos / theta**(2j/d)`` per axis (d = 44/42/42 for D=128, theta 1e4),
        rounded to ``dtype`` (keep fp32 to match diffusers). Compute once per request; permute and shard
        along dim 0 for a ``ForwardContext``.
        """
        grid = tuple(int(n) for n in grid_thw)
        if len(grid) != 3 or min(grid) <= 0 or max(grid) > self.config.rope_max_seq_len:
            raise ValueError(
                f"grid_thw must be 3 positive sizes <= rope_max_seq_len="
                f"{self.config.rope_max_seq_len}, got {grid}"
            )
        angles = []
        for axis, (n, d) in enumerate(zip(grid, self.config.rope_dims, strict=True)):
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
            angle = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv_freq)
            shape = [1, 1, 1, d // 2]
            shape[axis] = n
            angles.append(angle.view(shape).expand(*grid, d // 2))
        angle_SD = torch.cat(angles, dim=-1).reshape(math.prod(grid), -1)
        return angle_SD.cos().to(dtype), angle_SD.sin().to(dtype)

    def first_frame_tokens(self, grid_thw: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """bool [S, 1] in raster token order: the tokens of the first latent frame (Wan2.2 TI2V keeps them clean, at
        timestep 0, when the video starts from an image). Permute and shard along dim 0 for ``ctx.clean_tokens``."""
        if self.config.patch_size[0] != 1:
            raise ValueError(f"first-frame tokens need a temporal patch of 1 (one latent frame per token frame), "
                             f"got patch_size={self.config.patch_size}")
        t, h, w = (int(n) for n in grid_thw)
        return (torch.arange(t * h * w, device=device) < h * w)[:, None]

    def forward(
        self,
        hidden_states_BCFHW: torch.Tensor,
        timestep_B: torch.Tensor,
        encoder_hidden_states_BLC: torch.Tensor,
        encoder_hidden_states_image_BIC: torch.Tensor | None = None,
        *,
        ctx: ForwardContext | None = None,
    ) -> torch.Tensor:
        """Predict the flow/noise [B, out_channels, F, H, W] in the model dtype.

        I2V: ``hidden_states`` holds the noisy latents and the condition channels (``config.in_channels``: 16 + 4
        mask + 16 first-frame latents) and ``encoder_hidden_states_image`` the CLIP states; the image tokens add
        channels and context tokens only, so the token grid (and the SP shard plan) is the text-only one.
        ctx None: one device, raster order, dense SDPA. Otherwise tokens are permuted by
        ``ctx.token_order``, sharded with ``ctx.shard``, attended with ``ctx.attn[i]``, and brought back
        with ``ctx.gather`` and ``ctx.token_order_inverse``.
        """
        if (encoder_hidden_states_image_BIC is None) != (self.config.image_dim is None):  # a Python check, no sync
            raise ValueError(f"encoder_hidden_states_image must be given exactly when the model has an image branch "
                             f"(image_dim={self.config.image_dim})")
        dtype = self.patch_embedding.weight.dtype
        batch, _, frames, height, width = hidden_states_BCFHW.shape
        grid = self.grid_thw((frames, height, width))

        # 1. Patch embedding -> raster tokens [B, S, C], then processing order and this rank's shard.
        x_BCTHW = self.patch_embedding(hidden_states_BCFHW.to(dtype))
        x_BSC = x_BCTHW.flatten(2).transpose(1, 2)
        if ctx is None:
            rope = self.rope_tables(grid, x_BSC.device)
            attns: Sequence[SelfAttention] = [self._dense] * len(self.blocks)
            local_x_BSC = x_BSC.contiguous()
        else:
            rope, attns = ctx.rope, ctx.attn
            if ctx.token_order is not None:
                x_BSC = x_BSC[:, on_device(ctx.token_order, x_BSC.device)]
            local_x_BSC = ctx.shard(x_BSC).contiguous()
        del x_BCTHW, x_BSC  # only the local shard lives on (the full or permuted copy would stay to the end)

        # 2. Conditions: timestep -> temb and six modulation vectors per block; text (and image) -> model width.
        #    With ctx.clean_tokens (TI2V from an image) the selected tokens' timestep is 0: a second pair of rows
        #    and a per-token selection (diffusers embeds one timestep per token, [B, S, 6, C]; only two differ).
        text_BLC = encoder_hidden_states_BLC.to(self.condition_embedder.text_embedder.linear_1.weight.dtype)
        temb_BC, modulation_B6C, text_BLC = self.condition_embedder(timestep_B, text_BLC)
        clean_S1 = None if ctx is None else ctx.clean_tokens
        if clean_S1 is not None:
            clean_temb_BC, clean_modulation_B6C = self.condition_embedder.time(torch.zeros_like(timestep_B),
                                                                               text_BLC.dtype)
            modulation_B6C = TokenModulation(modulation_B6C, clean_modulation_B6C, clean_S1)
        image_BIC = None
        if encoder_hidden_states_image_BIC is not None:
            image_BIC = self.condition_embedder.image_embedder(encoder_hidden_states_image_BIC.to(dtype))

        # 3. Blocks, on the local token shard. Only `attn` mixes tokens (and communicates, under SP); the
        #    token-local stages around it run the composites or, after `use_fast_stages()`, the Triton ops.
        #    No names hold q, k, v, gate or the attention output: each is freed as soon as its last consumer
        #    returns (named, they would live on through the FFN and the next block's projections). The residual
        #    stage is split from cross-attention + FFN so that the attention output and the block's input are
        #    gone before the FFN's wide hidden activation, the forward's memory peak.
        attention_inputs, attention_residual, text_and_ffn = self._block_stages
        fused = self._fused_ops
        for block, attn in zip(self.blocks, attns, strict=True):
            local_x_BSC = attention_residual(
                block,
                local_x_BSC,
                attn(*attention_inputs(block, local_x_BSC, modulation_B6C, rope, attn.uses_gate, fused)),
                modulation_B6C,
                fused,
            )
            local_x_BSC = text_and_ffn(block, local_x_BSC, text_BLC, modulation_B6C, fused, image_BIC)

        # 4. Output norm and projection (token-local, so before the gather: fewer channels to move).
        shift, scale = (self.scale_shift_table + temb_BC.unsqueeze(1)).chunk(2, dim=1)
        if clean_S1 is not None:  # per token: [B, S_local, C]
            clean_shift, clean_scale = (self.scale_shift_table + clean_temb_BC.unsqueeze(1)).chunk(2, dim=1)
            shift, scale = modulation_B6C.select(shift, clean_shift), modulation_B6C.select(scale, clean_scale)
        local_x_BSC = modulated_layer_norm(local_x_BSC, 1 + scale, shift, self.norm_out.eps,
                                           fused and clean_S1 is None)
        local_out_BSP = self.proj_out(local_x_BSC)

        # 5. Back to the full sequence in raster order.
        out_BSP = local_out_BSP
        if ctx is not None:
            out_BSP = ctx.gather(local_out_BSP)
            if ctx.token_order_inverse is not None:
                out_BSP = out_BSP[:, on_device(ctx.token_order_inverse, out_BSP.device)]

        # 6. Unpatchify [B, T*Hh*Ww, pt*ph*pw*C] -> [B, C, F, H, W].
        p_t, p_h, p_w = self.config.patch_size
        out = out_BSP.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)


# --------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------


def build_wan_on_meta(config: WanConfig) -> WanTransformer:
    """The model with every parameter on the meta device (no memory); fill it with
    ``materialize_random_`` or ``models.loading.load_wan_weights_``."""
    with torch.device("meta"):
        return WanTransformer(config)


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def set_parameter_(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter ``name`` (dotted) by ``tensor`` (no grad), e.g. a meta parameter by real storage."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


@torch.no_grad()
def materialize_random_(
    model: WanTransformer, seed: int, device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> WanTransformer:
    """Fill every parameter with deterministic random values, identical on every rank and device.

    Each parameter draws from its own CPU generator seeded by (seed, name), so the result does not
    depend on the parameter order. Matrices/convs and biases ~ N(0, 0.02); norm weights 1 + N(0, 0.02);
    ``scale_shift_table`` ~ N(0, 1/dim) as in diffusers; ``to_gate_compress`` zero (no coarse VSA branch).
    Stored in ``dtype`` (fp32 for diffusers' keep-in-fp32 parameters) on ``device``.
    """
    for name, param in list(model.named_parameters()):
        gen = torch.Generator("cpu").manual_seed(_param_seed(seed, name))
        value = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "to_gate_compress" in name:
            value.zero_()
        elif name.endswith("scale_shift_table"):
            value /= param.shape[-1] ** 0.5
        elif param.ndim == 1 and name.endswith(".weight"):
            value = 1.0 + 0.02 * value
        else:
            value *= 0.02
        set_parameter_(model, name, value.to(device=device, dtype=wan_param_dtype(name, dtype)))
    return model
