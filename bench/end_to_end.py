"""A user's video, end to end, on a random 1.3B-sized Wan2.1 checkpoint in diffusers format: cold launch, warm launch
and a second request in one process, in two regimes, beside diffusers' WanPipeline on the same checkpoint.

    python bench/end_to_end.py --out bench_e2e.json [--dir /tmp/wan13b] [--text-layers 24] [--diffusers]
        [--regimes cfg50 distilled3] [--model vae_dtype=bfloat16]
    python bench/end_to_end.py --smoke --out /tmp/smoke.json     # tiny shapes on the CPU (checks the path)

Writes (once; reused when --dir already holds it) a 1.3B-sized DiT (bf16), a UMT5 encoder with the UMT5-XXL
width (d_model 4096, 64 heads, d_ff 10240) and `--text-layers` layers (24 = the real 5.7B encoder, ~11 GB on
disk), the default-size Wan VAE (fp32), a local word-level tokenizer and a flow UniPC scheduler config. Then, at
480x832x81 on one device, for each regime:
  cfg50: 50 UniPC steps, CFG (guidance 5, the two branches batched), VSA 0.9;
  distilled3: the DMD sampler's 3 steps (FastWan's regime: no CFG), VSA 0.8;
  cold_launch: a fresh `launch/generate.py` process with an empty `model.cache_dir`;
  warm_launch: the same command again (page cache and the cache directory warm);
  api: a fresh process doing `tessera.load(...)`, then `generate(...)` + `save(...)` twice (the second request with
       a new prompt and seed: the warm path a server sees).
Each entry: process wall seconds, the report's `stage_seconds` (load, text_encode, first_step, denoise, decode,
write, total), step seconds, peak memory, compile-cache and CUDA-graph entries. --diffusers: diffusers'
WanPipeline on the same checkpoint in its own process (bf16, SDPA, dense; text to uint8 frames, no mp4), for each
regime's step count (3 steps: UniPC without CFG, the same number of DiT forwards), after a one-step warm-up call.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch

DIT_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, eps=1e-6)
DIT_SMOKE = dict(DIT_13B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=48,
                 num_layers=2)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64)
UMT5_SMOKE = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4)
PROMPT = "a red fox running through fresh snow in the forest, cinematic lighting"


REPO = Path(__file__).resolve().parents[1]
SECOND_PROMPT = "a red fox running through fresh snow in the forest"
NEGATIVE_PROMPT = "blurry low quality"
REPORT_KEYS = ("stage_seconds", "step_seconds", "peak_memory_bytes", "sampler", "compile_cache", "cuda_graphs",
               "decode")
SIZE = dict(num_frames=81, height=480, width=832)
SMOKE_SIZE = dict(num_frames=13, height=64, width=96)  # >= one 4x4x4 VSA tile after patchify
# Per-request keys of each regime (the checkpoint is a plain WanPipeline one: its defaults are UniPC 50 steps,
# guidance 5); the DMD sampler works with any Wan checkpoint.
REGIMES = {
    "cfg50": {"num_steps": 50, "negative_prompt": NEGATIVE_PROMPT},
    "distilled3": {"scheduler": "dmd"},
}
REGIME_ATTENTION = {"cfg50": {"backend": "vsa", "sparsity": 0.9}, "distilled3": {"backend": "vsa", "sparsity": 0.8}}


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


def run_launch(argv: list[str], out: Path) -> dict:
    """One `launch/generate.py` process: wall seconds and its report's numbers."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), *argv, f"output.path={out}",
                           "output.overwrite=true"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(out.with_suffix(".json").read_text())
    return {"process_wall_seconds": wall, **{key: report.get(key) for key in REPORT_KEYS},
            "attention": {k: report["attention"][k] for k in ("backend", "sparsity_per_step")}}


def api_worker(spec: dict) -> dict:
    """In a fresh process: load once, then two requests (generate + save), each timed from the caller's side."""
    import tessera

    t0 = time.perf_counter()
    pipe = tessera.load(**spec["load"])
    result: dict = {"load_call_seconds": time.perf_counter() - t0, "requests": []}
    for index, (prompt, seed) in enumerate(((PROMPT, 0), (SECOND_PROMPT, 1))):
        profiler = cProfile.Profile() if spec.get("profile") else None
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        video = pipe.generate(prompt=prompt, seed=seed, **spec["request"])
        generate_seconds = time.perf_counter() - t0
        if profiler is not None:  # the host's time per function: where a first request's extra seconds go
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(70)
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
            Path(spec["out_dir"], f"profile-{spec['tag']}-{index}.txt").write_text(text.getvalue())
        video.save(Path(spec["out_dir"]) / f"api-{spec['tag']}-{index}.mp4", overwrite=True)
        result["requests"].append({"generate_call_seconds": generate_seconds,
                                   "prompt_to_mp4_seconds": time.perf_counter() - t0,
                                   **{key: video.report.get(key) for key in REPORT_KEYS}})
    pipe.close()
    return result


def run_api(spec: dict, out_dir: Path) -> dict:
    """`api_worker` in a fresh process (this file with --api-worker)."""
    spec_file, result_file = out_dir / f"api_spec_{spec['tag']}.json", out_dir / f"api_result_{spec['tag']}.json"
    spec_file.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--api-worker", str(spec_file), "--out",
                           str(result_file)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"API worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"process_wall_seconds": time.perf_counter() - t0, **json.loads(result_file.read_text())}


def launch_matrix(tag: str, model: dict, request: dict, attention: dict, out_dir: Path, launches: bool,
                  profile: bool = False) -> dict:
    """cold launch, warm launch (same `model.cache_dir`) and the API's two requests, for one set of keys."""
    argv = [f"model.{k}={v}" for k, v in model.items()] + [f"attention.{k}={v}" for k, v in attention.items()] + [
        f"{k}={v}" for k, v in request.items()] + [f"prompt={PROMPT}"]
    result: dict = {}
    if launches:
        result["cold_launch"] = run_launch(argv, out_dir / f"cold-{tag}.mp4")
        result["warm_launch"] = run_launch(argv, out_dir / f"warm-{tag}.mp4")
    spec = {"tag": tag, "out_dir": str(out_dir), "request": request,
            "load": {"model": model, "attention": attention}, "profile": profile}
    result["api"] = run_api(spec, out_dir)
    return result


def summary(regime: dict) -> dict:
    """The figures the issue names: first step vs a steady step per launch, and the second request's seconds."""
    def steps(entry):
        stage, step = entry.get("stage_seconds") or {}, entry.get("step_seconds") or []
        steady = sorted(step[1:])[len(step[1:]) // 2] if len(step) > 1 else None
        return {"first_step": stage.get("first_step"), "steady_step_median": steady,
                "first_over_steady": None if not steady else stage.get("first_step", 0) / steady,
                "total": stage.get("total"), "compile_seconds": (entry.get("compile_cache") or {}).get(
                    "compile_seconds")}

    out = {k: {"process_wall_seconds": regime[k]["process_wall_seconds"], **steps(regime[k])}
           for k in ("cold_launch", "warm_launch") if k in regime}
    requests = regime["api"]["requests"]
    out["api_first_request"] = {"prompt_to_mp4_seconds": requests[0]["prompt_to_mp4_seconds"], **steps(requests[0])}
    out["api_second_request"] = {"prompt_to_mp4_seconds": requests[1]["prompt_to_mp4_seconds"], **steps(requests[1])}
    return out


def diffusers_worker(spec: dict) -> dict:
    """diffusers' WanPipeline on the checkpoint, bf16 on the GPU: a one-step warm-up call, then each regime's call
    (text to uint8 frames), its seconds and peak memory."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    root = Path(spec["dir"])
    t0 = time.perf_counter()
    pipe = WanPipeline(  # our model_index.json names no components: each from its folder, the VAE in fp32
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype),
        transformer=WanTransformer3DModel.from_pretrained(root / "transformer", dtype=dtype),
        vae=AutoencoderKLWan.from_pretrained(root / "vae", dtype=torch.float32),
        scheduler=UniPCMultistepScheduler.from_pretrained(root / "scheduler"),
    ).to(device)
    result: dict = {"load_seconds": time.perf_counter() - t0, "runs": {}}
    pipe.set_progress_bar_config(disable=True)
    size = spec["size"]

    def call(steps: int, guidance: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator("cpu").manual_seed(0), output_type="np", **size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    result["warmup_one_step_seconds"] = call(1, 5.0)
    for name, (steps, guidance) in spec["regimes"].items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result["runs"][name] = {"steps": steps, "guidance_scale": guidance, "video_seconds": call(steps, guidance),
                                "peak_memory_bytes": int(torch.cuda.max_memory_allocated())
                                if device.type == "cuda" else None}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", default="/tmp/tessera_bench_wan13b")
    parser.add_argument("--text-layers", type=int, default=24)
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=sorted(REGIMES))
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra model.* keys for every run, e.g. vae_dtype=bfloat16")
    parser.add_argument("--api-only", action="store_true", help="skip the cold and warm launches")
    parser.add_argument("--profile", action="store_true", help="cProfile each API request (profile-*.txt)")
    parser.add_argument("--diffusers", action="store_true", help="also diffusers' WanPipeline, same checkpoint")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--api-worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--diffusers-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.api_worker or args.diffusers_worker:
        spec = json.loads(Path(args.api_worker or args.diffusers_worker).read_text())
        result = api_worker(spec) if args.api_worker else diffusers_worker(spec)
        Path(args.out).write_text(json.dumps(result))
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    root, out_dir = Path(args.dir), Path(args.out).resolve().parent / (Path(args.out).stem + "_runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dir": str(root),
                    "text_layers": args.text_layers, "model_keys": args.model, "regimes": {}}
    fresh = not (root / "model_index.json").is_file()
    t0 = time.perf_counter()
    if fresh:
        write_checkpoint(root, args.smoke, 2 if args.smoke else args.text_layers, device)
    result["checkpoint_written_now"], result["write_seconds"] = fresh, time.perf_counter() - t0

    dtype = "float32" if args.smoke else "bfloat16"
    size = SMOKE_SIZE if args.smoke else SIZE
    for name in args.regimes:
        cache = str(out_dir / f"cache_{name}_{time.time_ns()}")  # empty: the cold launch fills it
        model = {"path": str(root), "dtype": dtype, "cache_dir": cache, **dict(kv.split("=", 1) for kv in args.model)}
        request = {**REGIMES[name], **size, **({"num_steps": 2} if args.smoke and name == "cfg50" else {})}
        regime = launch_matrix(name, model, request, REGIME_ATTENTION[name], out_dir, not args.api_only, args.profile)
        sampler = regime["api"]["requests"][0]["sampler"]
        assert sampler["name"] == ("dmd" if name == "distilled3" else "unipc"), sampler
        regime["summary"] = summary(regime)
        result["regimes"][name] = regime
        print(json.dumps({name: regime["summary"]}, indent=1), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))  # so far: a run cut short keeps its regimes

    if args.diffusers:
        steps = {"cfg50": (2 if args.smoke else 50, 5.0), "distilled3": (3, 1.0)}
        spec = {"dir": str(root), "device": str(device), "dtype": dtype, "size": size,
                "regimes": {name: steps[name] for name in args.regimes}}
        spec_file, result_file = out_dir / "diffusers_spec.json", out_dir / "diffusers_result.json"
        spec_file.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--diffusers-worker", str(spec_file),
                               "--out", str(result_file)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"diffusers worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result["diffusers"] = {"process_wall_seconds": time.perf_counter() - t0, **json.loads(result_file.read_text())}
        print(json.dumps({"diffusers": result["diffusers"]}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
