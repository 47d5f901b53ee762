"""FastWan-1.3B regime end to end: 3 DMD steps, no CFG, VSA 0.8, on a random FastWan-shaped checkpoint.

    python bench/fastwan.py --out bench_fastwan.json [--dir /tmp/tessera_bench_fastwan13b] [--text-layers 24]
    python bench/fastwan.py --smoke --out /tmp/fastwan_smoke.json     # tiny shapes on the CPU (checks the path)

Writes (once; reused when --dir holds it) bench/end_to_end.py's random 1.3B-sized diffusers checkpoint, relabelled
as FastWan: model_index.json says WanDMDPipeline (its scheduler entry still UniPC, as FastWan's) and the DiT gets
random VSA gates (`attn1.to_gate_compress`), so the checkpoint's own defaults apply: DMD [1000, 757, 522], VSA at
the fastwan2.1-t2v-1.3b preset's 0.8 (the script checks the reports say so). For each size (448x832x61, the
preset's, and 480x832x81), on one device:
- cold launch: a fresh `launch/generate.py` process with an empty compile cache (`model.cache_dir`, when present);
- warm launch: the same command again (page cache and compile cache warm);
- API: a fresh process doing `tessera.load(...)`, then `generate(...)` + `save(...)` twice (the second request
  with a new prompt and seed: the warm path a server sees).
Each entry: process wall seconds and the report's per-stage seconds (load, text_encode, first_step, denoise,
decode, write, total), step seconds and peak memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from end_to_end import DIT_13B, DIT_SMOKE, launch_matrix, summary, write_checkpoint
from safetensors.torch import save_file

SIZES = ((61, 448, 832), (81, 480, 832))  # (frames, height, width): the preset's, then Wan2.1's 480p
SMOKE_SIZES = ((13, 64, 64), (17, 64, 96))  # >= one 4x4x4 VSA tile after patchify


def make_fastwan(root: Path, smoke: bool) -> None:
    """Relabel end_to_end.py's checkpoint as FastWan: WanDMDPipeline + random VSA gate weights in their own file."""
    arch = DIT_SMOKE if smoke else DIT_13B
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    gates = {}
    for block in range(arch["num_layers"]):
        name = f"blocks.{block}.attn1.to_gate_compress"
        gates[f"{name}.weight"] = (torch.randn(dim, dim, generator=gen) / dim**0.5).to(dtype)  # unit gain
        gates[f"{name}.bias"] = torch.zeros(dim, dtype=dtype)
    transformer = root / "transformer"
    save_file(gates, str(transformer / "vsa_gates.safetensors"))
    for index in transformer.glob("*.safetensors.index.json"):  # a sharded save: list the gates there too
        data = json.loads(index.read_text())
        data["weight_map"].update(dict.fromkeys(gates, "vsa_gates.safetensors"))
        index.write_text(json.dumps(data, indent=2))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanDMDPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", default="/tmp/tessera_bench_fastwan13b")
    parser.add_argument("--text-layers", type=int, default=24)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra model.* keys for every run, e.g. vae_dtype=bfloat16 quant=fp8")
    parser.add_argument("--api-only", action="store_true", help="skip the cold and warm launches")
    parser.add_argument("--profile", action="store_true", help="cProfile each API request (profile-*.txt)")
    parser.add_argument("--sizes", nargs="*", default=None, metavar="HxWxF",
                        help="only these sizes (default: 448x832x61 480x832x81)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    root, out_dir = Path(args.dir), Path(args.out).resolve().parent / (Path(args.out).stem + "_runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": str(device), "dir": str(root), "text_layers": args.text_layers, "regimes": []}
    fresh = not (root / "model_index.json").is_file()
    if fresh:
        write_checkpoint(root, args.smoke, 2 if args.smoke else args.text_layers, device)
        make_fastwan(root, args.smoke)
    result["checkpoint_written_now"] = fresh

    dtype = "float32" if args.smoke else "bfloat16"
    # The checkpoint's own defaults (DMD, VSA 0.8); the smoke DiT matches no preset, so give it the 1.3B sparsity.
    attention = {"sparsity": 0.8} if args.smoke else {}
    for frames, height, width in SMOKE_SIZES if args.smoke else SIZES:
        tag = f"{height}x{width}x{frames}"
        if args.sizes is not None and tag not in args.sizes:
            continue
        model = {"path": str(root), "dtype": dtype, "cache_dir": str(out_dir / f"cache_{tag}_{time.time_ns()}"),
                 **dict(kv.split("=", 1) for kv in args.model)}
        request = {"num_frames": frames, "height": height, "width": width}
        regime = {"size": tag, "model_keys": args.model,
                  **launch_matrix(tag, model, request, attention, out_dir, not args.api_only, args.profile)}
        sampler = regime["api"]["requests"][0]["sampler"]
        assert sampler["name"] == "dmd" and sampler["timesteps"] == [1000, 757, 522], sampler
        if not args.api_only:
            used = regime["cold_launch"]["attention"]
            assert used["backend"] == "vsa" and set(used["sparsity_per_step"]) == {0.8}, used
        regime["summary"] = summary(regime)
        result["regimes"].append(regime)
        print(json.dumps({tag: regime["summary"]}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
