"""Python front of the fused residual-context op (`torch.ops.rcd_ext.residual_context`).

Kernels live in csrc/ (CPU: statistics pass + BLAS GEMM in vocabulary chunks; CUDA: statistics
kernel + tensor-core GEMM in chunks), registered with torch.library under one schema; the fake
implementation below lets the op run under torch.compile(fullgraph=True) and torch.export.
The plain-torch specification is `rcd_ext.op_reference.residual_context_reference`.
"""

from __future__ import annotations

from typing import Literal

import torch

from rcd_ext import _extension
from rcd_ext.op_checks import check_logit_values, check_residual_context_args
from rcd_ext.op_reference import STRATEGIES, residual_context_reference

__all__ = ["STRATEGIES", "backend", "residual_context", "residual_context_reference"]

Backend = Literal["cpu-kernel", "cuda-kernel", "reference"]


def backend(device: str | torch.device = "cpu") -> Backend:
    """Which implementation `residual_context` runs for inputs on `device`."""
    device_type = torch.device(device).type
    if device_type == "cpu" and _extension.cpu_loaded:
        return "cpu-kernel"
    if device_type == "cuda" and _extension.cuda_loaded:
        return "cuda-kernel"
    return "reference"


def load_errors() -> dict[str, str | None]:
    """Why a compiled module did not load (None where it loaded or was not built)."""
    return {"cpu": _extension.cpu_error, "cuda": _extension.cuda_error}


def residual_context(
    logits: torch.Tensor,
    embed_weight: torch.Tensor,
    mask_embed: torch.Tensor,
    *,
    t_res: float = 1.0,
    temper_delta: bool = False,
    strategy: str = "entropy",
    alpha_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual input embeddings for the positions that stay masked.

    Args:
        logits: [N, V] float32/bfloat16/float16 logits of the N still-masked positions.
        embed_weight: [V', D] the model's input embedding table, V' >= V (padding rows unused).
        mask_embed: [D] embedding of the mask token, same dtype as embed_weight.
        t_res: residual temperature for alpha (and for delta when temper_delta).
        temper_delta: use softmax(z / t_res) for delta instead of softmax(z).
        strategy: "entropy" (alpha = H / log V), "confidence" (1 - H / log V) or "fixed".
        alpha_scale: multiplies alpha for every strategy (the alpha itself for "fixed").

    Returns:
        embeds [N, D] in embed_weight's dtype, alpha [N] float32.

    The outputs carry no gradient: RCD treats the residual as an input, never backpropagating
    through the denoising loop. Raises ValueError on NaN or +inf logits and on rows whose
    logits are all -inf.
    """
    check_residual_context_args(logits, embed_weight, mask_embed, t_res, strategy, alpha_scale)
    args = (logits.detach(), embed_weight.detach(), mask_embed.detach(),
            float(t_res), bool(temper_delta), strategy, float(alpha_scale))
    if backend(logits.device) == "reference":
        check_logit_values(args[0])
        return residual_context_reference(*args)
    return torch.ops.rcd_ext.residual_context(*args)


if _extension.cpu_loaded:

    @torch.library.register_fake("rcd_ext::residual_context")
    def _residual_context_fake(logits, embed_weight, mask_embed, t_res, temper_delta, strategy,
                               alpha_scale):
        n = logits.shape[0]
        embeds = embed_weight.new_empty((n, embed_weight.shape[1]))
        alpha = logits.new_empty((n,), dtype=torch.float32)
        return embeds, alpha
