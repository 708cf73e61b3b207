"""Denoising loops and `generate`: RCD and SeqD decoding through one sampler.

`generate` drives `loops.semi_autoregressive` (bidirectional models) or `loops.block_diffusion`
(block-causal models with a KV cache); RCD comes from running them on an `rcd_ext.wrap`-ped
model. `remasking` holds the commit policies and sampling.
"""

from rcd_ext.decoding.generation import DecodeStats, GenerationResult, StepTrace, generate

__all__ = ["DecodeStats", "GenerationResult", "StepTrace", "generate"]
