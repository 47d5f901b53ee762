"""The Wan VAE decoder from a diffusers checkpoint, on one rank or split by latent rows over several.

`WanVAEDecoder` decodes normalised latents to uint8 frames as diffusers' WanPipeline does. Several ranks can decode
one video together, each a block of the latent rows (`build_row_parallel_vae`: the causal 3-D convolutions see their
neighbours' rows through a halo exchange), rank 0 gathering the frames: the runtime injects the split of the rows and
its exchange (`parallel.RowSplit`), so nothing here communicates by itself. diffusers is imported lazily.
Shape legend: B batch, C channels, F latent frames, H/W latent height/width, T video frames; h a rank's block of rows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tessera.models.wan.conditioning import hf_progress_bars
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

__all__ = ["WanVAEDecoder", "build_row_parallel_vae"]


class WanVAEDecoder:
    """diffusers `AutoencoderKLWan` with the checkpoint's latent mean/std, its weights and activations in `dtype`
    (`model.vae_dtype`: float32 by default, as Wan's examples load it; bfloat16 or float16 decode faster).

    `decode`: normalised latents [B, C, F, H, W] (any float dtype) -> uint8 frames [B, T, sH, sW, 3], T = 4(F-1)+1,
    s the VAE's spatial compression (Wan2.1's VAE: C 16, s 8; Wan2.2's, TI2V-5B: C 48, s 16, its decoder's output
    unpatchified 2x2 inside `vae.decode`),
    converted as diffusers does: VideoProcessor 'np' output ((x/2 + 0.5).clamp(0, 1)) then export_to_video's
    `(frame * 255).astype(uint8)` (truncation). The latents are de-normalised in float32 and then cast to `dtype`;
    the frames leave the VAE in `dtype` and are converted to float32 before the uint8 step.
    `split_rows(H)` (the runtime's, e.g. `parallel.build_row_split` over the mesh; None: one rank) splits the H latent
    rows over several ranks: every rank then calls `decode` (or `decode_float`) with the same latents, each decodes
    its block exactly (see `build_row_parallel_vae`) and rank 0 gathers the frames (one point-to-point gather) and
    returns them; the other ranks return None. A split is an object with `num_ranks`, `holds_rows`, `shard`,
    `gather`, `all_gather` and `fill_halo_` (`parallel.RowSplit`).
    """

    def __init__(
        self, vae_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32, show_progress: bool = True,
        split_rows: Callable[[int], Any] | None = None,
    ) -> None:
        import diffusers.utils.logging
        from diffusers import AutoencoderKLWan

        with hf_progress_bars(diffusers.utils.logging, show_progress):
            self.vae = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=dtype).to(device).eval()
        if device.type == "cuda" and dtype != torch.float32:
            # cuDNN's channels-last 3-D convolutions: python bench/vae_decode.py --variants, H200, 480x832x81 bf16,
            # 1.68 s vs 1.86 s; the same weights, summed in another order (16-bit only: fp32 stays bit-exact).
            # cudnn.benchmark on top measured 1.68 s too, and the first decode of a request searched for 9.3 s
            # (bench/fastwan.py with it on), so it stays off.
            conv_weights_channels_last(self.vae.decoder)
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.dtype = dtype
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device).view(shape)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device).view(shape)
        self._split_rows = split_rows
        self._by_height: dict[int, tuple[Any, AutoencoderKLWan]] = {}  # latent H -> (split or None, its VAE)

    def decode_ranks(self, latent_height: int) -> int:
        """How many ranks decode latents with `latent_height` rows (each needs at least one row)."""
        return _num_ranks(self._split(latent_height)[0])

    def decode_float(self, latents_BCFHW: Tensor) -> Tensor | None:
        """Frames in [0, 1], float32 [B, T, sH, sW, 3] (diffusers' postprocess_video(output_type='np')); None on
        every rank but 0 of a mesh."""
        rows, frames_BThW3 = self._decode_rows(latents_BCFHW)
        if frames_BThW3 is None or _num_ranks(rows) == 1:
            return frames_BThW3
        return rows.gather(frames_BThW3, dim=2)

    def decode(self, latents_BCFHW: Tensor) -> Tensor | None:
        """uint8 frames [B, T, sH, sW, 3] on the latents' device; None on every rank but 0 of a mesh."""
        rows, frames_BThW3 = self._decode_rows(latents_BCFHW)
        if frames_BThW3 is None:
            return None
        frames_BThW3 = _to_uint8(frames_BThW3)
        if _num_ranks(rows) > 1:  # gathered as uint8: a quarter of the float frames' bytes
            frames_BThW3 = rows.gather(frames_BThW3, dim=2)
        return None if frames_BThW3 is None else frames_BThW3.to(latents_BCFHW.device)

    def streams(self, latent_height: int) -> bool:
        """Whether latents with `latent_height` rows decode on one rank, so `decode_streaming` can hand their frames
        over chunk by chunk (else `decode` splits the rows over the ranks)."""
        return _num_ranks(self._split(latent_height)[0]) == 1

    @torch.inference_mode()
    def decode_streaming(self, latents_BCFHW: Tensor, sink: Callable[[Tensor], None]) -> None:
        """`decode` on one decoding rank (`streams`), handing the uint8 frames [B, t, sH, sW, 3] to `sink` on the
        latents' device per latent frame as they come (1 frame, then 4 each). The frames are `decode`'s, bit for bit:
        the VAE's own causal loop (diffusers' `AutoencoderKLWan._decode`, its feature cache carried from chunk to
        chunk), minus the growing concatenation."""
        if not self.streams(latents_BCFHW.shape[3]):
            raise ValueError("decode_streaming decodes on one rank; these latents' rows are split over several "
                             "(streams() is False): call decode")
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(self._denormalise(latents_BCFHW))
            for index in range(x.shape[2]):
                vae._conv_idx = [0]
                video_BCThW = vae.decoder(x[:, :, index:index + 1], feat_cache=vae._feat_map,
                                          feat_idx=vae._conv_idx, first_chunk=index == 0)
                if vae.config.patch_size is not None:
                    video_BCThW = unpatchify(video_BCThW, patch_size=vae.config.patch_size)
                sink(_to_uint8(_to_unit_frames(video_BCThW.clamp(-1.0, 1.0))).to(latents_BCFHW.device))
        finally:
            vae.clear_cache()

    @torch.inference_mode()
    def _decode_rows(self, latents_BCFHW: Tensor) -> tuple[Any, Tensor | None]:
        """(the split of the latent rows (None: one rank), float frames [B, T, sh, sW, 3] of this rank's block, None
        if it has none)."""
        latents = latents_BCFHW.to(device=self._mean.device, dtype=torch.float32)
        rows, vae = self._split(latents.shape[3])
        if rows is not None and not rows.holds_rows:
            return rows, None
        if _num_ranks(rows) > 1:
            latents = rows.shard(latents, dim=3)
        video_BCThW = vae.decode(self._denormalise(latents), return_dict=False)[0]
        return rows, _to_unit_frames(video_BCThW)

    def _denormalise(self, latents_BCFHW: Tensor) -> Tensor:
        """WanPipeline's latents / (1 / std) + mean, in float32 (the mean/std of a bf16 VAE would round first), then
        in the VAE's dtype."""
        latents = latents_BCFHW.to(device=self._mean.device, dtype=torch.float32)
        return (latents / (1.0 / self._std) + self._mean).to(self.dtype)

    def _split(self, latent_height: int) -> tuple[Any, AutoencoderKLWan]:
        """The split of `latent_height` rows (None: this rank alone) and the VAE that decodes a block: cached by
        height."""
        if latent_height not in self._by_height:
            rows = None if self._split_rows is None else self._split_rows(latent_height)
            vae = self.vae if _num_ranks(rows) == 1 else build_row_parallel_vae(self.vae, rows)
            self._by_height[latent_height] = (rows, vae)
        return self._by_height[latent_height]


def _num_ranks(rows: Any) -> int:
    return 1 if rows is None else rows.num_ranks


def _to_unit_frames(video_BCThW: Tensor) -> Tensor:
    """The VAE's [-1, 1] video -> float32 frames in [0, 1] [B, T, H, W, 3] (diffusers' VideoProcessor 'np')."""
    return (video_BCThW.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)


def _to_uint8(frames_BThW3: Tensor) -> Tensor:
    """[0, 1] frames -> uint8 by truncation, as diffusers' export_to_video."""
    return (frames_BThW3 * 255).to(torch.uint8)


def conv_weights_channels_last(module: torch.nn.Module) -> None:
    """Every Conv3d weight (the 5-D parameters) of `module` in place to channels-last 3-D (cuDNN's NDHWC kernels)."""
    for param in module.parameters():
        if param.dim() == 5:
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)


def build_row_parallel_vae(vae: AutoencoderKLWan, rows: Any) -> AutoencoderKLWan:
    """A copy of diffusers' `vae` sharing its weights whose `decode` is row parallel: every rank of `rows` calls it
    together with its block of the latent rows (`rows.shard(latents, dim=3)`, [B, C, F, h, W]) and gets its block
    of the video rows ([B, 3, T, 8h, 8W]): exactly those rows of `vae.decode` on the full latents.

    In the decoder copy, every convolution with a 3x3 spatial kernel takes its H padding from the neighbouring
    blocks (a halo exchange; zeros at the image's top and bottom, as padding=1 gives), and the mid-block attention
    (over whole frames) runs on the all-gathered frame and keeps this rank's rows. The rest is row-local: RMS norms
    over channels, SiLU, nearest 2x upsampling (a block's rows double), 1x1 and time-only convolutions, and the
    causal time cache (each rank caches its own rows). Wan2.2's VAE (TI2V-5B) adds residual up blocks whose DupUp3D
    shortcuts only repeat each pixel into a 2x2 (x2 in time) block, and unpatchifies the decoder's output 2x2 per
    pixel: row-local too. ValueError for a decoder module this does not know.
    """
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan_vae

    row_local = tuple(getattr(wan_vae, name) for name in _ROW_LOCAL_WAN_MODULES if hasattr(wan_vae, name))
    shared = {id(t): t for t in (*vae.parameters(), *vae.buffers())}  # deepcopy keeps these: no weight copies
    parallel_vae = copy.deepcopy(vae, memo=shared)
    decoder, replaced = parallel_vae.decoder, []
    for name, module in list(decoder.named_modules()):
        if any(name.startswith(f"{prefix}.") for prefix in replaced):
            continue  # inside a wrapped module
        if isinstance(module, wan_vae.WanAttentionBlock):
            wrapper = _GatheredAttention(module, rows)
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            wrapper = _halo_conv(module, rows, wan_vae.WanCausalConv3d)
        elif isinstance(module, nn.Upsample):  # WanUpsample: row-local when nearest with an integer scale
            if not _is_nearest_integer_upsample(module):
                raise ValueError(f"row-parallel VAE: decoder.{name} ({module}) is not a nearest integer upsampling")
            wrapper = None
        elif isinstance(module, (*row_local, nn.SiLU, nn.Dropout, nn.Identity, nn.ModuleList, nn.Sequential)):
            wrapper = None
        else:
            raise ValueError(f"row-parallel VAE: decoder.{name} is a {type(module).__name__}, which this diffusers "
                             f"version added; row-parallel decode does not know whether it is row-local")
        if wrapper is not None:
            parent, _, child = name.rpartition(".")
            setattr(decoder.get_submodule(parent), child, wrapper)
            replaced.append(name)
    return parallel_vae


# diffusers' Wan VAE decoder modules that only mix values within a row block (or, upsampling, scale it).
_ROW_LOCAL_WAN_MODULES = ("WanDecoder3d", "WanMidBlock", "WanUpBlock", "WanResidualUpBlock", "WanResidualBlock",
                          "WanResample", "WanRMS_norm", "DupUp3D")


def _halo_conv(conv: nn.Conv2d | nn.Conv3d, rows: Any, causal_conv3d: type) -> nn.Module | None:
    """The halo wrapper of a convolution that mixes rows (None for one that does not: kernel height 1)."""
    is_causal_3d = isinstance(conv, causal_conv3d)
    if not is_causal_3d and not isinstance(conv, nn.Conv2d):
        raise ValueError(f"row-parallel VAE: a plain {type(conv).__name__} in the decoder is not supported")
    h = 1 if is_causal_3d else 0  # the H axis of the kernel
    pad_h = conv._padding[2] if is_causal_3d else conv.padding[h]
    if conv.kernel_size[h] == 1 and pad_h == 0:
        return None
    if (conv.kernel_size[h], conv.stride[h], conv.dilation[h]) != (2 * pad_h + 1, 1, 1) or conv.padding_mode != "zeros":
        raise ValueError(f"row-parallel VAE: {conv} is not a stride-1 'same' convolution along H")
    return _HaloCausalConv3d(conv, rows) if is_causal_3d else _HaloConv2d(conv, rows)


def _is_nearest_integer_upsample(module: nn.Upsample) -> bool:
    scales = module.scale_factor if isinstance(module.scale_factor, tuple) else (module.scale_factor,)
    return module.mode in ("nearest", "nearest-exact") and all(float(s).is_integer() for s in scales)


class _HaloCausalConv3d(nn.Module):
    """diffusers' WanCausalConv3d whose zero padding along H is replaced by the neighbouring blocks' rows."""

    def __init__(self, conv: nn.Conv3d, rows: Any) -> None:
        super().__init__()
        self.conv, self.rows = conv, rows

    def forward(self, x_BCFhW: Tensor, cache_x: Tensor | None = None) -> Tensor:
        padding = list(self.conv._padding)  # (W, W, H, H, causal T, 0), as WanCausalConv3d.forward pads
        if cache_x is not None and padding[4] > 0:
            x_BCFhW = torch.cat([cache_x.to(x_BCFhW.device), x_BCFhW], dim=2)
            padding[4] -= cache_x.shape[2]
        x_padded = self.rows.fill_halo_(F.pad(x_BCFhW, padding), dim=3, k=padding[2])
        return nn.Conv3d.forward(self.conv, x_padded)  # the conv's own padding is (0, 0, 0)


class _HaloConv2d(nn.Module):
    """An nn.Conv2d on [N, C, h, W] blocks (WanResample's, after upsampling) with its H padding from the neighbours."""

    def __init__(self, conv: nn.Conv2d, rows: Any) -> None:
        super().__init__()
        self.conv, self.rows = conv, rows

    def forward(self, x_NChW: Tensor) -> Tensor:
        pad_h, pad_w = self.conv.padding
        x_padded = self.rows.fill_halo_(F.pad(x_NChW, (pad_w, pad_w, pad_h, pad_h)), dim=2, k=pad_h)
        conv = self.conv
        return F.conv2d(x_padded, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


class _GatheredAttention(nn.Module):
    """WanAttentionBlock (attention over each whole frame) on the all-gathered frame; keeps this rank's rows."""

    def __init__(self, attn: nn.Module, rows: Any) -> None:
        super().__init__()
        self.attn, self.rows = attn, rows

    def forward(self, x_BCFhW: Tensor) -> Tensor:
        x_BCFHW = self.rows.all_gather(x_BCFhW, dim=3)
        return self.rows.shard(self.attn(x_BCFHW), dim=3)
