#!/usr/bin/env bash
# One GPU session: carried wheels, GPU-tier tests, attention micro-benchmark (with the FastVideo peer),
# DiT forward benchmarks. Run from the repo root on the device machine; results land in ${OUT:-bench_out}.
#   bash bench/gpu_suite.sh [tests] [fp8_tests] [product] [families_tests] [attention] [variants] [coarse] [profile] [block_ops] [dit_inputs] [attention_dit] [dit13] [dit14] [dit14_fp8] [sp13] [e2e] [stages] [vae] [fp8]
#       [sla] [fastwan] [fastwan_fp8] [families] [experts] [sp2 (2 GPUs)]   (default: tests attention dit13 dit14)
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# carried wheel folders (.whl: diffusers; .whl_peer: fastvideo-kernel; .whl_e2e: omegaconf, imageio-ffmpeg)
wheels=$(ls .whl*/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $wheels \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The repository root is the package `tessera`: make it importable without an install (no network there).
mkdir -p /tmp/tessera_alias && ln -sfn "$PWD" /tmp/tessera_alias/tessera && export PYTHONPATH=/tmp/tessera_alias:${PYTHONPATH:-}
parts=${*:-tests attention dit13 dit14}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for part in $parts; do
  case $part in
    tests) python3 -m pytest -q -m gpu tests/attention/test_vsa_triton.py tests/attention/test_vsa_metadata.py tests/models/test_qk_norm_rope.py tests/models/test_modulated_norm.py tests/models/test_wan.py tests/models/test_fp8.py tests/runtime/test_scheduler.py tests/runtime/test_graphs.py 2>&1 | tee "$OUT/tests.log" ;;
    fp8_tests) python3 -m pytest -q -m gpu tests/models/test_fp8.py tests/models/test_modulated_norm.py tests/models/test_wan.py 2>&1 | tee "$OUT/fp8_tests.log" ;;
    product) python3 -m pytest -q -m gpu -s -rA tests/launch/test_cli_gpu.py 2>&1 | tee "$OUT/product.log" ;;
    families_tests) python3 -m pytest -q -m gpu -s -rA tests/launch/test_families_gpu.py 2>&1 | tee "$OUT/families_tests.log" ;;
    attention) python3 bench/attention.py --peer --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" ;;
    variants) python3 bench/attention.py --sparsity 0.9 --variants --out "$OUT/variants.json" 2>&1 | tee "$OUT/variants.log" ;;
    coarse) python3 bench/attention.py --sparsity 0.9 --sla-topk --coarse --out "$OUT/coarse.json" 2>&1 | tee "$OUT/coarse.log" ;;
    profile) python3 bench/profile_vsa.py --forward --fp8 2>&1 | tee "$OUT/profile.log" ;;
    block_ops) python3 bench/block_ops.py --out "$OUT/block_ops.json" 2>&1 | tee "$OUT/block_ops.log" ;;
    dit_inputs) python3 bench/profile_vsa.py --dit-inputs 2>&1 | tee "$OUT/dit_inputs.log" ;;
    attention_dit) python3 bench/attention.py --peer --inputs dit --shapes wan1.3b-480p --sparsity 0.9 --sla-topk \
                     --out "$OUT/attention_dit.json" 2>&1 | tee "$OUT/attention_dit.log" ;;
    dit13) python3 bench/dit_forward.py --preset 1.3b --diffusers --cuda-graph --out "$OUT/dit_1.3b.json" 2>&1 | tee "$OUT/dit_1.3b.log" ;;
    e2e) python3 bench/end_to_end.py --diffusers --model vae_dtype=bfloat16 --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" ;;
    stages) python3 bench/dit_forward.py --preset 1.3b --stages fast compiled composite --out "$OUT/dit_stages.json" 2>&1 | tee "$OUT/dit_stages.log" ;;
    vae) python3 bench/vae_decode.py --variants --out "$OUT/vae.json" 2>&1 | tee "$OUT/vae.log" ;;
    fp8) python3 bench/fp8_gemm.py --out "$OUT/fp8_gemm.json" 2>&1 | tee "$OUT/fp8_gemm.log"
         python3 bench/dit_forward.py --preset 1.3b --fp8 --quality-steps 10 --out "$OUT/dit_1.3b_fp8.json" 2>&1 | tee "$OUT/dit_1.3b_fp8.log" ;;
    sla) python3 bench/attention.py --sla-only --out "$OUT/attention_sla.json" 2>&1 | tee "$OUT/attention_sla.log"
         python3 bench/dit_forward.py --preset 1.3b --sla-topk 0.1 --cuda-graph --out "$OUT/dit_1.3b_sla.json" 2>&1 | tee "$OUT/dit_1.3b_sla.log" ;;
    fastwan) python3 bench/fastwan.py --text-layers 2 --model vae_dtype=bfloat16 --out "$OUT/fastwan.json" 2>&1 | tee "$OUT/fastwan.log" ;;
    fastwan_fp8) python3 bench/fastwan.py --api-only --text-layers 2 --model vae_dtype=bfloat16 quant=fp8 --out "$OUT/fastwan_fp8.json" 2>&1 | tee "$OUT/fastwan_fp8.log" ;;
    sp2) bash bench/sp_gpu_check.sh 2>&1 | tee "$OUT/sp2.log" ;;
    sp13) python3 bench/dit_forward.py --preset 1.3b --sp 2 4 8 --iters 3 --cuda-graph --out "$OUT/dit_1.3b_sp.json" 2>&1 | tee "$OUT/dit_1.3b_sp.log" ;;
    dit14_fp8) python3 bench/dit_forward.py --preset 14b --iters 2 --fp8 --quality-steps 10 --out "$OUT/dit_14b_fp8.json" 2>&1 | tee "$OUT/dit_14b_fp8.log" ;;
    dit14) python3 bench/dit_forward.py --preset 14b --iters 2 --out "$OUT/dit_14b.json" 2>&1 | tee "$OUT/dit_14b.log" ;;
    families) python3 bench/dit_forward.py --preset ti2v5b --diffusers --iters 3 --out "$OUT/dit_ti2v5b.json" 2>&1 | tee "$OUT/dit_ti2v5b.log"
              python3 bench/dit_forward.py --preset 14b --diffusers --iters 2 --out "$OUT/dit_14b_diffusers.json" 2>&1 | tee "$OUT/dit_14b_diffusers.log" ;;
    experts) python3 bench/experts.py --out "$OUT/experts.json" 2>&1 | tee "$OUT/experts.log" ;;
  esac
done
