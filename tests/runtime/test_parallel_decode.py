"""Parallel (row-split) Wan VAE decode on real gloo ranks equals single-rank diffusers `AutoencoderKLWan.decode`.

Small random VAEs (the same seed on every rank), latent heights that do not split evenly (7, 11, 5) and heights
with fewer rows than ranks; `dim_mult=[1, 2, 4, 4]` changes the channel count around every upsampling. One spawned
3-rank job (diffusers' import dominates, so one job) decodes every case split over 2 ranks (the third idles: the
exchange is point-to-point) and over 3, through `WanVAEDecoder` on the whole mesh, and once in one process (the
reference); the parent compares (fp32, relative 1e-5). A bfloat16 decoder (`model.vae_dtype`) on the same mesh gives
the one-process bfloat16 frames up to bf16 rounding.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))  # the multirank harness, tests/parallel

from _dist import run_multirank  # noqa: E402
from tessera.models.wan.vae import WanVAEDecoder, build_row_parallel_vae  # noqa: E402
from tessera.parallel import RowSplit, build_mesh, build_row_split, split_sizes  # noqa: E402

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers"),
]

WORLD_SIZE = 3
REL_TOL = 1e-5
TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
VAES = {
    "tiny": TINY,
    "mult1244": dict(TINY, dim_mult=[1, 2, 4, 4]),
    # Wan2.2's layout (residual up blocks with DupUp3D shortcuts, 2x2 patches, 16x spatial): row-local too
    "residual": dict(TINY, decoder_base_dim=16, dim_mult=[1, 2, 2, 2], is_residual=True, in_channels=12,
                     out_channels=12, patch_size=2, scale_factor_spatial=16),
}
# (vae, latent frames, H, W); H=7, 11 and 5 split unevenly on 2 and 3 ranks
DECODE_CASES = [("tiny", 3, 7, 6), ("mult1244", 3, 11, 6), ("residual", 2, 5, 3)]
# through WanVAEDecoder on the 3-rank mesh (normalisation, uint8, the gather to rank 0); H=2, 1: fewer rows than ranks
DECODER_HEIGHTS = (7, 2, 1)
# bf16 split over 3 ranks vs bf16 in one process: the blocks' convolutions round differently (uint8 levels)
BF16_LEVELS = 10


def _vae(name: str):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(**VAES[name]).eval()


def _latents(seed: int, frames: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(1, 16, frames, height, width, generator=torch.Generator().manual_seed(seed))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@torch.inference_mode()
def _job(rank: int, world_size: int, vae_dir: str) -> dict:
    out: dict = {}
    for i, (name, frames, height, width) in enumerate(DECODE_CASES):
        vae, latents = _vae(name), _latents(i, frames, height, width)
        for num_ranks in (2, 3):
            rows = RowSplit(sizes=tuple(split_sizes(height, num_ranks)), ranks=tuple(range(num_ranks)), rank=rank)
            if rows.holds_rows:
                block = build_row_parallel_vae(vae, rows).decode(rows.shard(latents, dim=3), return_dict=False)[0]
                out[name, num_ranks] = (rows.offsets[rows.index], block, rows.gather(block, dim=3))
        if rank == world_size - 1:  # the single-process reference
            out[name, "reference"] = vae.decode(latents, return_dict=False)[0]
    if rank == 0:
        _vae("tiny").save_pretrained(vae_dir)
    dist.barrier()
    mesh = build_mesh(cfg=1, sp=world_size, device=torch.device("cpu"))
    split_rows = lambda height: build_row_split(height, mesh)  # noqa: E731
    decoder = WanVAEDecoder(Path(vae_dir), torch.device("cpu"), split_rows=split_rows)
    one_process = WanVAEDecoder(Path(vae_dir), torch.device("cpu")) if rank == world_size - 1 else None
    for height in DECODER_HEIGHTS:
        latents = _latents(height, 3, height, 6)
        out[height] = (decoder.decode_ranks(height), decoder.decode_float(latents), decoder.decode(latents))
        if one_process is not None:
            out[height, "reference"] = (one_process.decode_float(latents), one_process.decode(latents))
    latents = _latents(7, 3, 7, 6)
    bf16 = WanVAEDecoder(Path(vae_dir), torch.device("cpu"), torch.bfloat16, split_rows=split_rows)
    out["bfloat16"] = bf16.decode(latents)
    if one_process is not None:
        out["bfloat16", "reference"] = WanVAEDecoder(Path(vae_dir), torch.device("cpu"), torch.bfloat16).decode(latents)
    return out


def test_row_parallel_decode_matches_one_process(tmp_path: Path) -> None:
    results = run_multirank(_job, WORLD_SIZE, str(tmp_path / "vae"), timeout_s=120.0)
    refs = results[-1]
    for name, _, height, _ in DECODE_CASES:
        ref = refs[name, "reference"]
        scale = ref.shape[3] // height  # 8 (16 for the patched VAE)
        assert ref.float().std() > 0.1 and (ref.abs() < 1).float().mean() > 0.9  # not clamped flat
        for num_ranks in (2, 3):
            for rank, result in enumerate(results[:num_ranks]):
                offset, block, gathered = result[name, num_ranks]
                assert block.shape[3] in (scale * (height // num_ranks), scale * (height // num_ranks + 1))
                err = _rel_err(block, ref.narrow(3, offset * scale, block.shape[3]))
                assert err <= REL_TOL, f"{name}: rank {rank} of {num_ranks}, block rows from {offset}: {err:.2e}"
                assert (gathered is None) == (rank != 0)
            assert (name, num_ranks) not in results[2] or num_ranks == 3  # the idle rank held no rows
            assert _rel_err(results[0][name, num_ranks][2], ref) <= REL_TOL, (name, num_ranks)

    for height in DECODER_HEIGHTS:
        ref_float, ref_uint8 = refs[height, "reference"]
        for rank, result in enumerate(results):
            num_ranks, frames_float, frames_uint8 = result[height]
            assert num_ranks == min(WORLD_SIZE, height)
            if rank > 0:  # only rank 0 gets the frames
                assert frames_float is None and frames_uint8 is None
                continue
            assert frames_float.shape == ref_float.shape and frames_uint8.shape == ref_uint8.shape
            assert _rel_err(frames_float, ref_float) <= REL_TOL, f"H={height}"
            # uint8 truncation: a float difference of ~1e-7 may cross an integer boundary, nothing more
            assert (frames_uint8.int() - ref_uint8.int()).abs().max().item() <= 1

    bf16, bf16_ref = results[0]["bfloat16"], refs["bfloat16", "reference"]
    assert bf16.dtype == torch.uint8 and bf16.shape == bf16_ref.shape == refs[7, "reference"][1].shape
    assert all(result["bfloat16"] is None for result in results[1:])
    assert (bf16.int() - bf16_ref.int()).abs().max().item() <= BF16_LEVELS
    assert not torch.equal(bf16_ref, refs[7, "reference"][1])  # it did decode in bf16
