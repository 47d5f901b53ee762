"""Sparse-Linear Attention (SLA): metadata, the plain-PyTorch reference (the spec), the backend.

The semantics TurboWan's SLA checkpoints were trained with: 1-D blocks of consecutive RASTER-order tokens (block_q
queries, block_k keys; the last block of each may be partial). Each query block attends exactly (softmax) to the
real tokens of its top-k key blocks by mean-pooled block score, and every query attends linearly to all tokens; the
linear output goes through the layer's ``proj_l``. The Triton kernels are in ``attention.sla_triton``.
Legend: B batch, N heads, S tokens (raster order), D head dim, Q query blocks, K key blocks, J selected key blocks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tessera.attention.registry import Backend, register_backend, triton_kernel_problem

SLA_FEATURE_MAPS = ("softmax", "elu", "relu")
SLA_LINEAR_EPS = 1e-5  # o_linear = phi(q) kv / (SLA_LINEAR_EPS + phi(q) . ksum), as trained
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# tl.dot needs K >= 16; D = 256 would hold a [128, 256] fp32 accumulator and a [256, 256] fp32 kv per program.
_TRITON_HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True, kw_only=True)
class SLAMetadata:
    """Per-request SLA block geometry for one token count, top-k and device (built once, reused by all steps)."""

    seq_len: int  # S = T * H * W tokens, raster order
    block_q: int  # query tokens per block (the last block may be partial)
    block_k: int  # key tokens per block (the last block may be partial)
    num_q_blocks: int  # Q = ceil(S / block_q)
    num_k_blocks: int  # K = ceil(S / block_k)
    topk: float  # attention.sla_topk: the fraction of key blocks each query block keeps
    num_selected: int  # J = sla_num_selected(topk, K)
    feature_map: str  # phi of the linear branch: softmax (over D), elu (elu + 1) or relu
    device: torch.device


def sla_num_selected(topk: float, num_k_blocks: int) -> int:
    """``min(K, max(1, floor(topk * K)))``: the key blocks each query block keeps.

    The floor is of the float64 product, deliberately not of an exact rational (unlike VSA's ``vsa_topk``): the
    checkpoints were trained with ``int(topk * K)``, so 0.1 * 30 = 3.0000000000000004 keeps 3 blocks, and 0.29 * 100
    = 28.999999999999996 keeps 28, not 29. No epsilon is added (it would round that 28 up to 29).
    """
    return min(num_k_blocks, max(1, math.floor(float(topk) * num_k_blocks)))


def _check_topk(topk: float) -> float:
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise TypeError(f"attention.sla_topk must be a number in (0, 1], got {topk!r}; use e.g. attention.sla_topk=0.1")
    if not 0.0 < float(topk) <= 1.0:  # also rejects NaN
        raise ValueError(
            f"attention.sla_topk must lie in (0, 1] (the fraction of key blocks each query block keeps), got "
            f"{topk!r}; use e.g. attention.sla_topk=0.1 (1 keeps every block; for dense attention set "
            "attention.backend=dense)"
        )
    return float(topk)


def _check_block(key: str, size: int, default: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1):
        raise ValueError(
            f"{key} must be a positive power of two, got {size!r}; use {key}={default} (what the SLA "
            "checkpoints were trained with) or another power of two such as 32 or 256"
        )
    return size


def _check_feature_map(feature_map: str, key: str = "attention.sla_feature_map") -> str:
    if feature_map not in SLA_FEATURE_MAPS:
        raise ValueError(
            f"{key} must be one of {', '.join(SLA_FEATURE_MAPS)}, got {feature_map!r}; use {key}=softmax "
            "(the TurboWan checkpoints' feature map) unless the checkpoint says otherwise"
        )
    return feature_map


def build_sla_metadata(
    grid_thw: tuple[int, int, int],
    device: torch.device | str,
    *,
    sla_topk: float,
    sla_block_q: int = 128,
    sla_block_k: int = 64,
    sla_feature_map: str = "softmax",
) -> SLAMetadata:
    """SLA block geometry for a ``(T, H, W)`` token grid (S = T * H * W tokens in raster order).

    Raises ``ValueError`` naming the config key for a top-k outside (0, 1], a block size that is not a positive power
    of two, or an unknown feature map.
    """
    if len(grid_thw) != 3 or any(isinstance(g, bool) or int(g) != g or g < 1 for g in grid_thw):
        raise ValueError(f"SLA grid (T, H, W) must be three positive ints, got {grid_thw!r}")
    topk = _check_topk(sla_topk)
    block_q = _check_block("attention.sla_block_q", sla_block_q, 128)
    block_k = _check_block("attention.sla_block_k", sla_block_k, 64)
    seq_len = math.prod(int(g) for g in grid_thw)
    num_k_blocks = -(-seq_len // block_k)
    return SLAMetadata(
        seq_len=seq_len,
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=-(-seq_len // block_q),
        num_k_blocks=num_k_blocks,
        topk=topk,
        num_selected=sla_num_selected(topk, num_k_blocks),
        feature_map=_check_feature_map(sla_feature_map),
        device=torch.device(device),
    )


def _block_means(x_BNSD: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 mean of each block of ``block`` consecutive tokens over its real tokens: [B, N, ceil(S / block), D]."""
    B, N, S, D = x_BNSD.shape
    num_blocks = -(-S // block)
    padded = F.pad(x_BNSD.float(), (0, 0, 0, num_blocks * block - S))  # zero rows: add nothing to the sums
    counts = torch.full((num_blocks, 1), float(block), device=x_BNSD.device)
    counts[-1] = S - (num_blocks - 1) * block
    return padded.view(B, N, num_blocks, block, D).sum(3) / counts


def sla_block_scores(q_BNSD: torch.Tensor, k_BNSD: torch.Tensor, metadata: SLAMetadata) -> torch.Tensor:
    """Block scores (the spec, fp32): ``mean_q[qb] . (mean_k[kb] - mean of k over all S)``, no scale.

    q_BNSD, k_BNSD: [B, N, S, D], any float dtype. Returns fp32 [B, N, Q, K].
    """
    k = k_BNSD.float()
    k_centred = k - k.mean(2, keepdim=True)
    q_pooled = _block_means(q_BNSD, metadata.block_q)
    k_pooled = _block_means(k_centred, metadata.block_k)
    return torch.matmul(q_pooled, k_pooled.transpose(-1, -2))


def sla_topk_reference(scores: torch.Tensor, num_selected: int) -> torch.Tensor:
    """The ``num_selected`` highest scores per row, ties to the lower index: int32 [..., J], ascending.

    NaN ranks lowest (below -inf), so a NaN row still selects real, distinct blocks: the first J.
    """
    ranked = torch.sort(scores.nan_to_num(nan=-math.inf), dim=-1, descending=True, stable=True).indices
    return ranked[..., :num_selected].sort(dim=-1).values.to(torch.int32)


def sla_select_blocks(q_BNSD: torch.Tensor, k_BNSD: torch.Tensor, metadata: SLAMetadata) -> torch.Tensor:
    """The key blocks each query block attends to exactly: int32 [B, N, Q, J], ascending (the spec)."""
    return sla_topk_reference(sla_block_scores(q_BNSD, k_BNSD, metadata), metadata.num_selected)


def sla_feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi of the linear branch over the last dim: softmax (no scale), elu(x) + 1 or relu; in x's dtype."""
    if feature_map == "softmax":
        return torch.softmax(x, dim=-1)
    if feature_map == "elu":
        return F.elu(x) + 1.0
    return F.relu(x)


def _sparse_part(q_BNSD, k_BNSD, v_BNSD, block_index_BNQJ, metadata: SLAMetadata) -> torch.Tensor:
    """fp32 softmax attention of each query over the real tokens of its block's selected key blocks, one query
    block at a time (memory [B, N, block_q, J * block_k], so the reference also runs at real sizes on a GPU)."""
    q, k, v = q_BNSD.float(), k_BNSD.float(), v_BNSD.float()
    B, N, S, D = q.shape
    bq, bk = metadata.block_q, metadata.block_k
    out = torch.empty_like(q)
    within = torch.arange(bk, device=q.device)
    for qb in range(metadata.num_q_blocks):
        keys = (block_index_BNQJ[:, :, qb].long()[..., None] * bk + within).flatten(-2)  # [B, N, J * bk]
        real = keys < S  # the partial last key block's slots past S
        keys = keys.clamp(max=S - 1)[..., None].expand(-1, -1, -1, D)
        scores = torch.matmul(q[:, :, qb * bq : (qb + 1) * bq], k.gather(2, keys).transpose(-1, -2)) / math.sqrt(D)
        probs = torch.softmax(scores.masked_fill(~real[:, :, None, :], -math.inf), dim=-1)
        out[:, :, qb * bq : (qb + 1) * bq] = torch.matmul(probs, v.gather(2, keys))
    return out


def sla_linear_reference(q_BNSD, k_BNSD, v_BNSD, feature_map: str) -> torch.Tensor:
    """fp32 linear attention over all tokens: ``phi(q) (phi(k)^T v) / (eps + phi(q) . sum_s phi(k_s))`` [B, N, S, D]."""
    phi_q, phi_k = sla_feature(q_BNSD.float(), feature_map), sla_feature(k_BNSD.float(), feature_map)
    kv_BNDD = torch.matmul(phi_k.transpose(-1, -2), v_BNSD.float())
    ksum_BN1D = phi_k.sum(2, keepdim=True)
    return torch.matmul(phi_q, kv_BNDD) / (SLA_LINEAR_EPS + (phi_q * ksum_BN1D).sum(-1, keepdim=True))


def sla_attention_reference(
    q_BNSD: torch.Tensor,
    k_BNSD: torch.Tensor,
    v_BNSD: torch.Tensor,
    metadata: SLAMetadata,
    *,
    feature_map: str | None = None,
    proj_l_weight: torch.Tensor | None = None,
    proj_l_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SLA spec in plain PyTorch (any device; fp32 math; the CPU path of ``SLAAttention``).

    q_BNSD, k_BNSD, v_BNSD: [B, N, S, D] in raster order, one float dtype, any strides; S == metadata.seq_len.
    Returns ``o_sparse + proj_l(o_linear)`` [B, N, S, D] in q's dtype, rounded once: ``o_sparse`` is softmax attention
    (scale 1/sqrt(D)) of each query over the real tokens of its block's ``sla_select_blocks``; ``o_linear`` is
    ``sla_linear_reference`` over all tokens; ``proj_l(x) = x W^T + b`` with W [D, D], b [D] (None: zero bias).
    ``proj_l_weight=None`` means proj_l = 0: the output is ``o_sparse``. ``feature_map`` None: the metadata's.
    """
    if q_BNSD.shape[2] != metadata.seq_len or k_BNSD.shape != q_BNSD.shape or v_BNSD.shape != q_BNSD.shape:
        raise ValueError(f"SLA reference: q, k, v must share one [B, N, {metadata.seq_len}, D] shape")
    if proj_l_weight is None and proj_l_bias is not None:
        raise ValueError("SLA reference: proj_l_bias without proj_l_weight (None means proj_l = 0)")
    feature_map = metadata.feature_map if feature_map is None else _check_feature_map(feature_map, "feature_map")
    out = _sparse_part(q_BNSD, k_BNSD, v_BNSD, sla_select_blocks(q_BNSD, k_BNSD, metadata), metadata)
    if proj_l_weight is not None:
        bias = None if proj_l_bias is None else proj_l_bias.float()
        out = out + F.linear(sla_linear_reference(q_BNSD, k_BNSD, v_BNSD, feature_map), proj_l_weight.float(), bias)
    return out.to(q_BNSD.dtype)


def sla_check_supported(dtype: torch.dtype, head_dim: int, device: torch.device | str) -> str | None:
    """Why SLA cannot run with these settings, or ``None`` (checked once per plan). The CPU reference runs any
    positive head dim; the Triton kernel (CUDA) takes head dims 16/32/64/128."""
    return triton_kernel_problem("SLA", dtype, head_dim, device, dtypes=_SUPPORTED_DTYPES,
                                 head_dims=_TRITON_HEAD_DIMS)


class SLAAttention:
    """SLA backend over a raster-order sequence: ``(q, k, v) [B, N, S, D] -> out [B, N, S, D]`` (q's dtype).

    ``impl``: ``"reference"`` = :func:`sla_attention_reference`; ``"triton"`` = the kernels of ``attention.sla_triton``
    (block means, scores and top-k; the linear state phi(k)^T v; the sparse kernel with the linear branch and proj_l
    fused into its epilogue); ``"auto"`` = triton when ``metadata.device`` is CUDA, else reference. Resolved once here
    into ``self.kernel`` (reported), never per call. ``feature_map`` None: the metadata's.
    proj_l is per transformer block: ``for_layer(weight, bias)`` returns a bound copy sharing the metadata and kernel
    choice; this unbound object runs with proj_l = 0 (the output is the sparse part alone).
    """

    name: str = "sla"
    uses_gate: bool = False
    writes_out: bool = True  # takes out_BNSD= (AttentionBackend)

    def __init__(
        self,
        metadata: SLAMetadata,
        *,
        feature_map: str | None = None,
        impl: Literal["auto", "reference", "triton"] = "auto",
        dtype: torch.dtype | None = None,
        head_dim: int | None = None,
    ) -> None:
        if impl not in ("auto", "reference", "triton"):
            raise ValueError(f"SLAAttention impl must be 'auto', 'reference' or 'triton', got {impl!r}")
        if impl == "auto":
            impl = "triton" if metadata.device.type == "cuda" else "reference"
        if impl == "triton" and (head_dim not in (None, *_TRITON_HEAD_DIMS) or dtype not in (None, *_SUPPORTED_DTYPES)):
            raise ValueError(
                f"SLAAttention impl='triton' takes head dims {_TRITON_HEAD_DIMS} and float16/bfloat16/float32, got "
                f"head dim {head_dim}, dtype {dtype}; use impl='reference'"
            )
        self.metadata = metadata
        if feature_map is not None:
            _check_feature_map(feature_map, "SLAAttention feature_map")
        self.feature_map = feature_map or metadata.feature_map
        self.kernel = impl  # "reference" or "triton"; reported
        self.head_dim = head_dim
        self.proj_l_weight: torch.Tensor | None = None
        self.proj_l_bias: torch.Tensor | None = None
        self._triton = None
        if impl == "triton":
            from tessera.attention import sla_triton

            self._triton = sla_triton

    def for_layer(self, proj_l_weight: torch.Tensor | None, proj_l_bias: torch.Tensor | None) -> SLAAttention:
        """A copy bound to one transformer block's ``proj_l`` (weight [D, D], bias [D] or None; y = x W^T + b), sharing
        the metadata and kernel choice. ``(None, None)``: proj_l = 0. The tensors are referenced (detached), not
        copied: they stay on their device and in their dtype (the kernels compute in fp32)."""
        if proj_l_weight is None and proj_l_bias is not None:
            raise ValueError("SLAAttention.for_layer: proj_l_bias without proj_l_weight (None means proj_l = 0)")
        if proj_l_weight is not None:
            dim = proj_l_weight.shape[-1]
            if (proj_l_weight.shape != (dim, dim) or self.head_dim not in (None, dim)
                    or (proj_l_bias is not None and proj_l_bias.shape != (dim,))):
                raise ValueError(
                    f"SLAAttention.for_layer: proj_l must be Linear(D, D) with D = head dim {self.head_dim}: weight "
                    f"[D, D] and bias [D], got {tuple(proj_l_weight.shape)} and "
                    f"{None if proj_l_bias is None else tuple(proj_l_bias.shape)}"
                )
        bound = copy.copy(self)
        bound.proj_l_weight = None if proj_l_weight is None else proj_l_weight.detach().contiguous()
        bound.proj_l_bias = None if proj_l_bias is None else proj_l_bias.detach().contiguous()
        return bound

    def __call__(
        self,
        q_BNSD: torch.Tensor,
        k_BNSD: torch.Tensor,
        v_BNSD: torch.Tensor,
        gate_BNSD: torch.Tensor | None = None,
        out_BNSD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if gate_BNSD is not None:
            # Internal contract: callers compute a gate only for backends with uses_gate=True.
            raise ValueError("SLAAttention has uses_gate=False; the caller must pass gate_BNSD=None")
        m = self.metadata
        if self._triton is None:
            result = sla_attention_reference(q_BNSD, k_BNSD, v_BNSD, m, feature_map=self.feature_map,
                                             proj_l_weight=self.proj_l_weight, proj_l_bias=self.proj_l_bias)
            return result if out_BNSD is None else out_BNSD.copy_(result)
        scores_BNQK = self._triton.sla_pooled_scores(q_BNSD, k_BNSD, m.block_q, m.block_k)
        block_index_BNQJ = self._triton.sla_topk_blocks(scores_BNQK, m.num_selected)
        return self._triton.sla_sparse_attention(
            q_BNSD, k_BNSD, v_BNSD, block_index_BNQJ, m.block_q, m.block_k, feature_map=self.feature_map,
            proj_l_weight=self.proj_l_weight, proj_l_bias=self.proj_l_bias, out_BNSD=out_BNSD,
        )

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"SLAAttention(S={m.seq_len}, blocks={m.block_q}x{m.block_k}, topk={m.topk} "
            f"({m.num_selected}/{m.num_k_blocks}), feature_map={self.feature_map!r}, kernel={self.kernel!r}, "
            f"proj_l={'bound' if self.proj_l_weight is not None else 'zero'})"
        )


def _bind_proj_l(attn: SLAAttention, attention_module) -> SLAAttention:
    # the block's self-attention module holds proj_l (an nn.Linear(D, D)) when the checkpoint has one; else None: 0
    proj_l = getattr(attention_module, "proj_l", None)
    return attn.for_layer(None, None) if proj_l is None else attn.for_layer(proj_l.weight, proj_l.bias)


def sla_reference_bytes(
    batch: int, heads: int, tokens: int, head_dim: int, *, sla_topk: float, sla_block_q: int = 128,
    sla_block_k: int = 64, sla_feature_map: str = "softmax",
) -> int:
    """Peak bytes ``sla_attention_reference`` allocates beyond its inputs, the larger of its two phases. Sparse: the
    fp32 output, fp32 copies of q, k, v (16-bit inputs), the block scores [B, N, Q, K] and one query block's fp32
    scores, their masked copy and the probabilities [B, N, block_q, J * block_k] with its gathered fp32 keys and
    values [B, N, J * block_k, D] and their int64 indices. Linear: the output, phi(q), phi(k), the numerator and the
    denominator's product, each an fp32 [B, N, S, D]."""
    num_q_blocks, num_k_blocks = -(-tokens // sla_block_q), -(-tokens // sla_block_k)
    keys = sla_num_selected(sla_topk, num_k_blocks) * sla_block_k
    sequence = tokens * head_dim * 4  # one fp32 [S, D] per head
    sparse = (4 * sequence + num_q_blocks * num_k_blocks * 4
              + sla_block_q * keys * 3 * 4 + keys * head_dim * 4 * 2 + keys * 8)
    return batch * heads * max(sparse, 5 * sequence)


def _sla_backend_metadata(
    grid_thw: tuple[int, int, int], sparsity: float | None, device: torch.device, **options
) -> SLAMetadata:
    # takes_sparsity=False: attention.sparsity does not apply (the registry passes None); the level is sla_topk
    return build_sla_metadata(grid_thw, device, **options)


SLA_BACKEND = register_backend(Backend(
    name="sla",
    sparse=True,
    uses_gate=SLAAttention.uses_gate,
    check_supported=lambda dtype, head_dim, device, grid_thw: sla_check_supported(dtype, head_dim, device),
    auto_problem=lambda device: (
        "SLA runs only when asked for (attention.backend=sla) or by an SLA checkpoint: it needs the checkpoint's "
        "trained proj_l"
    ),
    build_metadata=_sla_backend_metadata,
    token_order=lambda metadata: None,  # SLA's 1-D blocks are defined on raster order: keep it
    build=lambda metadata, dtype, head_dim: SLAAttention(metadata, dtype=dtype, head_dim=head_dim),
    config_keys=("sla_topk", "sla_block_q", "sla_block_k", "sla_feature_map"),
    takes_sparsity=False,
    bind_layer=_bind_proj_l,
    layer_weight="proj_l",
    reference_bytes=sla_reference_bytes,
))
