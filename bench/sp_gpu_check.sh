#!/usr/bin/env bash
# Sequence parallelism on real GPUs (NCCL): the tiny preset with VSA at sp=1 and sp=2, fp32 and bf16, 4 steps;
# prints the relative difference of the final latents (sp=2 against sp=1). Needs 2 GPUs, omegaconf and
# imageio-ffmpeg: run it as `bash bench/gpu_suite.sh sp2`, which installs the carried wheels first.
set -euo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
for dtype in float32 bfloat16; do
  for sp in 1 2; do
    torchrun --nproc_per_node=$sp launch/generate.py parallel.sp=$sp attention.backend=vsa num_steps=4 \
      model.dtype=$dtype output.path="$OUT/sp${sp}_${dtype}.mp4" output.save_latents=true output.overwrite=true \
      2>&1 | grep -E "wrote|Error|error" || true
  done
done
python3 - "$OUT" <<'EOF'
import json, sys
from safetensors.torch import load_file
out = sys.argv[1]
for dtype in ("float32", "bfloat16"):
    one, two = (load_file(f"{out}/sp{sp}_{dtype}.latents.safetensors")["latents"] for sp in (1, 2))
    report = json.load(open(f"{out}/sp2_{dtype}.json"))
    err = ((two - one).norm() / one.norm()).item()
    blocks = report["attention"]["backend_per_block"]
    print(json.dumps({"dtype": dtype, "sp2_vs_sp1_rel_err": err, "world_size": report["world_size"],
                      "device": report["device"], "backends": sorted({b for step in blocks for b in step}),
                      "step_seconds": [round(t, 4) for t in report["step_seconds"]]}))
EOF
