"""Writes a tiny random Wan2.1 checkpoint in diffusers format (no downloads) and its native-format copy.

transformer (WanTransformer3DModel), text_encoder (UMT5EncoderModel), tokenizer (a local WordLevel tokenizer
saved as PreTrainedTokenizerFast, loadable with AutoTokenizer), vae (AutoencoderKLWan), scheduler (UniPC with
flow sigmas), model_index.json: all through `WanPipeline.save_pretrained`. `write_i2v_checkpoint` adds a tiny
CLIPVisionModel (image_encoder/) and CLIPImageProcessor (image_processor/) through
`WanImageToVideoPipeline.save_pretrained`. `write_ti2v_checkpoint` swaps in a Wan2.2-layout VAE (48 latent channels, 16x
spatial) and a DiT on its latents, with `expand_timesteps` in model_index.json, as Wan2.2 TI2V-5B.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TEXT_DIM = 32
FLOW_SHIFT = 2.0
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024,
)
IMAGE_DIM = 24  # the tiny CLIP's width = the I2V DiT's image_dim; added_kv_proj_dim is the DiT width (2 x 16)
I2V_TRANSFORMER_OVERRIDES = dict(in_channels=36, image_dim=IMAGE_DIM, added_kv_proj_dim=32)
TI2V_Z_DIM = 48  # the Wan2.2 VAE's latent channels = the TI2V DiT's in/out channels
# Wan2.2's VAE layout at tiny width: residual up/down blocks (DupUp3D / AvgDown3D shortcuts), RGB patchified 2x2 into
# 12 channels, 3 spatial halvings x the patch = 16x spatial, 4x temporal.
TI2V_VAE_CONFIG = dict(base_dim=8, decoder_base_dim=16, z_dim=TI2V_Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                       is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
WORDS = "a red fox running through fresh snow in the forest cinematic lighting blurry low quality".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_diffusers_checkpoint(root: Path, seed: int = 0, **transformer_overrides) -> Path:
    """The tiny checkpoint; `transformer_overrides` change TRANSFORMER_CONFIG (e.g. 12 heads x 128 for the GPU
    kernels)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(**_components(seed, transformer_overrides))
    pipe.save_pretrained(str(root), safe_serialization=True)
    return root


def write_i2v_checkpoint(root: Path, seed: int = 0, **transformer_overrides) -> Path:
    """The tiny Wan2.1 I2V checkpoint: the DiT with 36 input channels and an image branch (image_dim 24, the CLIP
    width; added_kv_proj_dim 32, the DiT width), a 2-layer CLIP vision tower on 28x28 crops in 14x14 patches (5
    tokens: 4 patches + class), and its image processor (resize shortest edge to 28, centre crop 28x28).
    `transformer_overrides` as `write_diffusers_checkpoint`'s (a wider DiT needs added_kv_proj_dim = its width)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    components = _components(seed, {**I2V_TRANSFORMER_OVERRIDES, **transformer_overrides})
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=IMAGE_DIM, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=14)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    pipe = WanImageToVideoPipeline(**components, image_encoder=image_encoder, image_processor=processor)
    pipe.save_pretrained(str(root), safe_serialization=True)
    return root


def write_two_expert_checkpoint(root: Path, boundary_ratio: float, seed: int = 0) -> Path:
    """A tiny Wan2.2 A14B-shaped checkpoint: transformer/ (high noise) and transformer_2/ (low noise), one
    architecture with different random weights, and `boundary_ratio` in model_index.json."""
    from diffusers import WanPipeline

    transformer_2 = _components(seed + 1, {})["transformer"]  # another seed: other weights
    pipe = WanPipeline(**_components(seed, {}), transformer_2=transformer_2, boundary_ratio=boundary_ratio)
    pipe.save_pretrained(str(root), safe_serialization=True)
    return root


def write_ti2v_checkpoint(root: Path, seed: int = 0, pipeline_class: str | None = None) -> Path:
    """A tiny Wan2.2 TI2V-5B-shaped checkpoint: `TI2V_VAE_CONFIG` with its own random latents_mean/std (48 entries),
    the DiT with 48 in/out channels, `expand_timesteps: true` in model_index.json (WanPipeline's per-token
    timesteps); `pipeline_class` relabels model_index.json (e.g. WanDMDPipeline: FastWan2.2-TI2V-5B)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    components = _components(seed, dict(in_channels=TI2V_Z_DIM, out_channels=TI2V_Z_DIM))
    gen = torch.Generator().manual_seed(seed + 1)
    stats = dict(latents_mean=(0.3 * torch.randn(TI2V_Z_DIM, generator=gen)).tolist(),
                 latents_std=(0.5 + torch.rand(TI2V_Z_DIM, generator=gen)).tolist())
    torch.manual_seed(seed)
    components["vae"] = AutoencoderKLWan(**TI2V_VAE_CONFIG, **stats).eval()
    WanPipeline(**components, expand_timesteps=True).save_pretrained(str(root), safe_serialization=True)
    if pipeline_class is not None:
        index = read_json(root / "model_index.json")
        (root / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    return root


def _components(seed: int, transformer_overrides: dict) -> dict:
    """transformer, text_encoder, tokenizer, vae, scheduler: the random parts both pipelines share."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **transformer_overrides})
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight clearly non-trivial
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=32, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0)
    ).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=FLOW_SHIFT
    )
    return dict(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer)


def write_native_copy(diffusers_root: Path, dest: Path) -> Path:
    """Same checkpoint, transformer/ weights renamed to the native Wan2.1 layout (norm2 -> norm3 etc.)."""
    shutil.copytree(diffusers_root, dest)
    state = {}
    for file in sorted((dest / "transformer").glob("*.safetensors")):
        state.update(load_file(str(file)))
        file.unlink()
    save_file({_to_native(k): v.contiguous() for k, v in state.items()},
              str(dest / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert "blocks.0.self_attn.q.weight" in _to_native_names(state)
    return dest


_TOP = {
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "condition_embedder.image_embedder.norm1.": "img_emb.proj.0.",
    "condition_embedder.image_embedder.ff.net.0.proj.": "img_emb.proj.1.",
    "condition_embedder.image_embedder.ff.net.2.": "img_emb.proj.3.",
    "condition_embedder.image_embedder.norm2.": "img_emb.proj.4.",
    "proj_out.": "head.head.",
    "scale_shift_table": "head.modulation",
}
_BLOCK = {
    "attn1.to_q.": "self_attn.q.", "attn1.to_k.": "self_attn.k.", "attn1.to_v.": "self_attn.v.",
    "attn1.to_out.0.": "self_attn.o.", "attn1.": "self_attn.", "attn2.to_q.": "cross_attn.q.",
    "attn2.add_k_proj.": "cross_attn.k_img.", "attn2.add_v_proj.": "cross_attn.v_img.",
    "attn2.norm_added_k.": "cross_attn.norm_k_img.",
    "attn2.to_k.": "cross_attn.k.", "attn2.to_v.": "cross_attn.v.", "attn2.to_out.0.": "cross_attn.o.",
    "attn2.": "cross_attn.", "norm2.": "norm3.", "ffn.net.0.proj.": "ffn.0.", "ffn.net.2.": "ffn.2.",
    "scale_shift_table": "modulation",
}


def _to_native(key: str) -> str:
    if key.startswith("blocks."):
        _, n, rest = key.split(".", 2)
        for old, new in _BLOCK.items():
            if rest.startswith(old):
                return f"blocks.{n}.{new}{rest[len(old):]}"
        return key
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _to_native_names(state: dict) -> set[str]:
    return {_to_native(k) for k in state}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
