"""Tessera: sequence-parallel inference for Wan video diffusion transformers with Video Sparse Attention.

The repository root is this package (`tessera.runtime`, `tessera.launch`, ...); see README "Python API".
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tessera")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
