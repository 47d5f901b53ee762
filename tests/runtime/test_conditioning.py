"""Tiny text encoder / preview decoder contracts and diffusers-exact initial noise."""

from __future__ import annotations

import pytest
import torch
from tessera.models.family import latent_shape
from tessera.models.wan.conditioning import (
    WAN21_LATENT_RGB_BIAS,
    WAN21_LATENT_RGB_FACTORS,
    TinyLatentDecoder,
    TinyTextEncoder,
    num_video_frames,
)
from tessera.runtime.scheduler import draw_initial_noise


@pytest.mark.parametrize(
    ("batch", "num_frames", "height", "width", "seed"),
    [(1, 17, 64, 64, 0), (2, 81, 48, 80, 42), (1, 1, 16, 32, 2**40), (1, 20, 64, 96, 3)],
)
def test_initial_noise_matches_diffusers(
    batch: int, num_frames: int, height: int, width: int, seed: int
) -> None:
    torch_utils = pytest.importorskip("diffusers.utils.torch_utils")
    noise = draw_initial_noise(batch, num_frames, height, width, seed)
    shape = (batch, 16, (num_frames - 1) // 4 + 1, height // 8, width // 8)
    assert noise.shape == shape and noise.dtype == torch.float32 and noise.device.type == "cpu"
    ref = torch_utils.randn_tensor(
        shape,
        generator=torch.Generator("cpu").manual_seed(seed),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    assert torch.equal(noise, ref)
    assert not torch.equal(noise, draw_initial_noise(batch, num_frames, height, width, seed + 1))


def test_initial_noise_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_frames"):
        draw_initial_noise(1, 0, 64, 64, 0)
    with pytest.raises(ValueError, match="height"):
        draw_initial_noise(1, 5, 4, 64, 0)


def test_text_encoder_deterministic_and_zero_padded() -> None:
    enc = TinyTextEncoder(24, max_length=8, seed=3)
    out = enc.encode(["ab", "", "a long prompt past max_length", "é"])
    assert out.shape == (4, 8, 24) and out.dtype == torch.float32
    assert enc.text_dim == 24 and enc.max_length == 8
    assert out[0, :2].abs().sum() > 0 and torch.all(out[0, 2:] == 0)
    assert torch.all(out[1] == 0)  # empty prompt
    assert torch.all(out[2] != 0)  # truncated to max_length, no zero rows
    assert out[3, :2].abs().sum() > 0 and torch.all(out[3, 2:] == 0)  # "é" is 2 UTF-8 bytes
    # Same byte, different position -> different vector (positional term); same prompt -> same output.
    aa = enc.encode(["aa"])
    assert not torch.equal(aa[0, 0], aa[0, 1])
    assert torch.equal(aa[0, 0], out[0, 0])
    again = TinyTextEncoder(24, max_length=8, seed=3).encode(["ab", "", "a long prompt past max_length", "é"])
    assert torch.equal(out, again)
    assert not torch.equal(TinyTextEncoder(24, max_length=8, seed=4).encode(["ab"]), out[:1])
    with pytest.raises(TypeError, match="list"):
        enc.encode("ab")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [None, 5])
def test_preview_decoder_shapes_and_upsampling(seed: int | None) -> None:
    dec = TinyLatentDecoder(seed=seed)
    latents = torch.randn(2, 16, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    frames = dec.decode(latents)
    assert frames.dtype == torch.uint8 and frames.shape == (2, num_video_frames(3), 32, 40, 3)
    assert num_video_frames(3) == 9 and num_video_frames(1) == 1
    # Frame 0 <- latent frame 0; frames 1-4 <- latent frame 1; 5-8 <- 2. Pixel (y, x) <- latent (y//8, x//8).
    for t, lf in ((0, 0), (1, 1), (4, 1), (5, 2), (8, 2)):
        single = dec.decode(latents[:, :, lf : lf + 1])[:, 0]
        assert torch.equal(frames[:, t], single)
    assert torch.equal(frames[:, :, 8:16, 16:24], frames[:, :, 8:9, 16:17].expand(-1, -1, 8, 8, -1))
    assert frames.float().std() > 10  # not a constant image
    assert torch.equal(dec.decode(latents.double()), frames)


def test_preview_decoder_wan_factors_values() -> None:
    latents = torch.zeros(1, 16, 1, 1, 1)
    latents[0, 2] = 1.0
    rgb = torch.tensor(WAN21_LATENT_RGB_FACTORS[2]) + torch.tensor(WAN21_LATENT_RGB_BIAS)
    expected = ((rgb + 1) * 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(TinyLatentDecoder().decode(latents)[0, 0, 0, 0], expected)
    with pytest.raises(ValueError, match="latents must be"):
        TinyLatentDecoder().decode(torch.zeros(1, 4, 1, 1, 1))


def test_latent_shape() -> None:
    assert latent_shape(81, 480, 832) == (21, 60, 104)
    assert latent_shape(17, 64, 64) == (5, 8, 8)


@pytest.mark.parametrize(("frames", "height", "width", "patch"), [(81, 480, 832, (1, 2, 2)), (13, 112, 80, (1, 2, 2)),
                                                                  (21, 256, 448, (2, 4, 2))])
def test_token_grid_is_the_models_grid_of_the_latent_shape(frames, height, width, patch):
    from tessera.models.family import token_grid
    from tessera.models.wan import WanConfig, build_wan_on_meta

    model = build_wan_on_meta(WanConfig(num_attention_heads=2, attention_head_dim=16, ffn_dim=32, num_layers=1,
                                        patch_size=patch, text_dim=32))
    assert token_grid(frames, height, width, patch) == model.grid_thw(latent_shape(frames, height, width))
