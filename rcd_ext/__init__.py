"""rcd-ext: Residual Context Diffusion for diffusion LLMs."""

from rcd_ext import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
