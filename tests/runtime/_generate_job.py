"""A torchrun job through the Python API: `torchrun ... _generate_job.py '<json>' <out.pt>`.

The JSON holds `load` and `generate` keyword dicts; rank 0 saves `{"frames", "latents", "report"}` to out.pt
(the frames as the API returns them, uint8 [T, H, W, 3], which the CLI would only write as a lossy mp4).
"""

from __future__ import annotations

import json
import sys

import tessera
import torch

if __name__ == "__main__":
    keys, out = json.loads(sys.argv[1]), sys.argv[2]
    with tessera.load(**keys["load"]) as pipe:
        video = pipe.generate(**keys["generate"])
        if video.frames is not None:
            torch.save({"frames": torch.from_numpy(video.frames), "latents": video.latents, "report": video.report},
                       out)
