"""rcd-ext: Residual Context Diffusion for diffusion LLMs.

`ops` (the fused op), `generate` and `wrap` load on first use, so that `import rcd_ext` (and
`rcd --help`) imports neither torch nor transformers. `rcd_ext.models.register_tiny_dllm()`
(or importing any tiny-model name) registers the built-in tiny dLLM with the transformers Auto
classes.
"""

__version__ = "0.1.0"
__all__ = ["generate", "ops", "wrap", "__version__"]


def __getattr__(name: str):
    if name == "ops":
        import rcd_ext.ops

        return rcd_ext.ops
    if name == "generate":
        from rcd_ext.decoding import generate

        return generate
    if name == "wrap":
        from rcd_ext.wrapper import wrap

        return wrap
    raise AttributeError(f"module 'rcd_ext' has no attribute {name!r}")
