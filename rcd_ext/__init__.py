"""rcd-ext: Residual Context Diffusion for diffusion LLMs.

`rcd_ext.ops` (the fused op) loads eagerly; `generate` and `wrap` load on first use so that
`import rcd_ext` (and `rcd --help`) does not import transformers. `import rcd_ext.models`
registers the built-in tiny dLLM with the transformers Auto classes.
"""

from rcd_ext import ops

__version__ = "0.1.0"
__all__ = ["generate", "ops", "wrap", "__version__"]


def __getattr__(name: str):
    if name == "generate":
        from rcd_ext.decoding import generate

        return generate
    if name == "wrap":
        from rcd_ext.wrapper import wrap

        return wrap
    raise AttributeError(f"module 'rcd_ext' has no attribute {name!r}")
