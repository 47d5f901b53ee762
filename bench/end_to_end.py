"""End to end on a random Wan2.1 checkpoint written in diffusers format: load, text, denoise, decode, memory.

    python bench/end_to_end.py --out bench_e2e.json [--dir /tmp/wan13b] [--text-layers 24] [--steps 50]
    python bench/end_to_end.py --smoke --out /tmp/smoke.json     # tiny shapes on the CPU (checks the path)

Writes (once; reused when --dir already holds it) a 1.3B-sized DiT (bf16), a UMT5 encoder with the UMT5-XXL
width (d_model 4096, 64 heads, d_ff 10240) and `--text-layers` layers (24 = the real 5.7B encoder, ~11 GB on
disk; fewer layers for a quicker, proportionally cheaper text phase), the default-size Wan VAE (fp32), a local
word-level tokenizer and a flow UniPC scheduler config. Then times, on one device: DiT weight loading (host peak
RSS included), text encoding (load + encode prompt and negative prompt), the full `launch/generate.py` run
(denoising, peak device memory, from its report) and VAE decoding of the final latents. A warm page cache makes
reloads faster than a first read from disk: the JSON says whether the checkpoint was just written.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from tessera.launch.generate import main as generate_main  # noqa: E402
from tessera.models.wan import WanConfig, build_wan_on_meta, load_wan_weights_  # noqa: E402
from tessera.models.wan.checkpoint import resolve_checkpoint  # noqa: E402
from tessera.models.wan.components import UMT5TextEncoder  # noqa: E402
from tessera.models.wan.vae import WanVAEDecoder  # noqa: E402

DIT_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, eps=1e-6)
DIT_SMOKE = dict(DIT_13B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=48,
                 num_layers=2)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64)
UMT5_SMOKE = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4)
PROMPT = "a red fox running through fresh snow in the forest, cinematic lighting"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = dict.fromkeys(PROMPT.replace(",", " ").split() + ["blurry", "low", "quality"])
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_checkpoint(root: Path, smoke: bool, text_layers: int, device: torch.device) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    root.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device(device):
        WanTransformer3DModel(**(DIT_SMOKE if smoke else DIT_13B)).to(dtype).save_pretrained(root / "transformer")
        umt5 = UMT5Config(**(UMT5_SMOKE if smoke else UMT5_XXL), num_layers=text_layers, dropout_rate=0.0)
        UMT5EncoderModel(umt5).to(dtype).save_pretrained(root / "text_encoder")
        vae_kwargs = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1) if smoke else {}
        AutoencoderKLWan(**vae_kwargs).save_pretrained(root / "vae")
    _tokenizer(umt5.vocab_size).save_pretrained(root / "tokenizer")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        root / "scheduler"
    )
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", default="/tmp/tessera_bench_wan13b")
    parser.add_argument("--text-layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--backend", default="dense")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    size = dict(num_frames=9, height=32, width=48) if args.smoke else dict(num_frames=81, height=480, width=832)
    root = Path(args.dir)
    result: dict = {"device": str(device), "dir": str(root), "text_layers": args.text_layers}

    fresh = not (root / "model_index.json").is_file()
    t0 = time.perf_counter()
    if fresh:
        write_checkpoint(root, args.smoke, 2 if args.smoke else args.text_layers, device)
    result["checkpoint_written_now"], result["write_seconds"] = fresh, time.perf_counter() - t0
    ckpt = resolve_checkpoint(root)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 1. DiT weights: meta model, tensors streamed to the device in bf16.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    model = build_wan_on_meta(WanConfig(**ckpt.arch))
    load_report = load_wan_weights_(model, ckpt.weights, device=device, dtype=dtype)
    _sync(device)
    result["load_seconds"] = time.perf_counter() - t0
    result["load_bytes"] = load_report.num_bytes
    result["host_peak_rss_bytes_during_load"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["host_peak_rss_grew_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    del model

    # 2. Text: load UMT5 + tokenizer, encode prompt and negative prompt.
    t0 = time.perf_counter()
    encoder = UMT5TextEncoder(ckpt.text_encoder, ckpt.tokenizer, device=device, dtype=dtype)
    _sync(device)
    result["text_load_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder.encode([PROMPT, "blurry low quality"])
    _sync(device)
    result["text_encode_seconds"] = time.perf_counter() - t0
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. The whole run through the CLI entry point (text, load, denoise, decode, write).
    out = Path(args.out).with_suffix(".mp4")
    argv = [f"model.path={root}", f"model.dtype={'float32' if args.smoke else 'bfloat16'}", f"prompt={PROMPT}",
            "negative_prompt=blurry low quality", f"num_steps={2 if args.smoke else args.steps}",
            f"attention.backend={args.backend}", f"output.path={out}", "output.overwrite=true",
            "output.save_latents=true", *(f"{k}={v}" for k, v in size.items())]
    t0 = time.perf_counter()
    assert generate_main(argv) == 0
    result["generate_wall_seconds"] = time.perf_counter() - t0
    report = json.loads(out.with_suffix(".json").read_text())
    for key in ("total_seconds", "denoise_seconds", "peak_memory_bytes", "step_seconds", "cuda_graphs",
                "compile_cache"):
        result[f"generate_{key}"] = report.get(key)

    # 4. VAE decode of the final latents, alone.
    from safetensors.torch import load_file

    latents = load_file(str(out.with_suffix(".latents.safetensors")))["latents"].to(device)
    decoder = WanVAEDecoder(ckpt.vae, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    decoder.decode(latents)
    _sync(device)
    result["decode_seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        result["decode_peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
