"""Tessera: sequence-parallel inference for Wan video diffusion transformers with Video Sparse Attention.

    import tessera
    pipe = tessera.load(model={"preset": "wan-tiny"})
    video = pipe.generate(prompt="a red fox in snow", seed=3, num_steps=4)
    video.save("fox.mp4")

The repository root is this package (`tessera.runtime`, `tessera.launch`, ...); README "Python API" has the rest.
"""

from importlib.metadata import PackageNotFoundError, version

from tessera.launch.api import Video, VideoPipeline, load
from tessera.runtime.guards import Cancelled

try:
    __version__ = version("tessera")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0.0.0+unknown"

__all__ = ["Cancelled", "Video", "VideoPipeline", "__version__", "load"]
