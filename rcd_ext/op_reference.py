"""The residual-context op in plain torch: the specification every kernel is tested against.

For each of the N rows (positions that stay masked) with logits z over V vocabulary entries:

    q      = softmax(z / t_res)                       (the tempered distribution)
    H      = -sum_v q_v log q_v                       (0 * log 0 = 0, so -inf logits add nothing)
    alpha  = alpha_scale * H / log V                  strategy "entropy" (the paper)
           = alpha_scale * (1 - H / log V)            strategy "confidence"
           = alpha_scale                              strategy "fixed"
             (each strategy's function of H / log V: `rcd_ext.alpha_strategies`)
    p      = softmax(z)          (softmax(z / t_res) when temper_delta)
    delta  = p @ E[:V]                                (full vocabulary, the input embedding table)
    embeds = (1 - alpha) * mask_embed + alpha * delta

Vocabulary rule: logits may be narrower than the embedding table (V <= V'): logit column v pairs
with embedding row v and the extra rows (padding, e.g. LLaDA's table is wider than its tokenizer)
are never read. Logits wider than the table are refused: those columns have no embedding.

This function materialises [N, V] tensors and computes in float32; it is the spec, not the fast
path. Validation lives in `rcd_ext.op_checks`, shared with the kernels' front.

Top-k residual (`residual_context_top_k_reference`, the spec of `residual_top_k=k`): alpha is
exactly the above (full-vocabulary entropy); delta keeps the k largest logits' rows and spreads
the rest of the probability mass uniformly over the other rows:

    S      = the k columns with the largest logits z (ties: the lower column first)
    delta  = sum_{j in S} p_j E_j + (sum_{j not in S} p_j) * mean_{j not in S} E_j

with p the exact full-vocabulary probabilities. This is exact when the tail's probabilities are
equal (uniform logits: any k), and equals the formula above for k >= V.
"""

from __future__ import annotations

import math

import torch

from rcd_ext.alpha_strategies import STRATEGIES, get_alpha_strategy

__all__ = ["STRATEGIES", "reference_alpha", "residual_context_reference",
           "residual_context_top_k_reference", "tempered_shifted_logits"]


def tempered_shifted_logits(z: torch.Tensor, t_res: float) -> torch.Tensor:
    """(z - max z) / t_res per row, float32 [N, V]: softmax(z / t_res) of these is the same
    distribution, and subtracting the maximum first keeps logits near the float32 limit (|z| ~
    3e38, or z / t_res past it for t_res < 1) finite; a difference that overflows is -inf, whose
    probability is 0 in any precision."""
    shifted = z - z.amax(-1, keepdim=True)
    return shifted if t_res == 1.0 else shifted * (1.0 / t_res)


def reference_alpha(z: torch.Tensor, t_res: float, strategy: str,
                    alpha_scale: float) -> torch.Tensor:
    """alpha [N] float32 of float32 logits z [N, V] by the registered `strategy`, from the
    normalized entropy of softmax(z / t_res) (zeros, not computed, when it ignores them)."""
    chosen = get_alpha_strategy(strategy)
    n, vocab = z.shape
    if not chosen.uses_entropy:
        return chosen.alpha(torch.zeros(n, dtype=torch.float32, device=z.device),
                            float(alpha_scale))
    log_q = torch.log_softmax(tempered_shifted_logits(z, t_res), dim=-1)
    q = log_q.exp()
    # where q == 0 (including -inf logits) the term is 0, not 0 * -inf = nan
    plogp = torch.where(q > 0, q * log_q, torch.zeros_like(q))
    entropy = (-plogp.sum(-1)).clamp(0.0, math.log(vocab))
    return chosen.alpha(entropy / math.log(vocab), float(alpha_scale))


def _mixed(alpha: torch.Tensor, mask_embed: torch.Tensor, delta: torch.Tensor,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """((1 - alpha) mask_embed + alpha delta in `dtype` [N, D], alpha [N])."""
    mask = mask_embed.detach().float()
    embeds = (1.0 - alpha)[:, None] * mask[None, :] + alpha[:, None] * delta
    return embeds.to(dtype), alpha


def residual_context_reference(
    logits: torch.Tensor, embed_weight: torch.Tensor, mask_embed: torch.Tensor,
    t_res: float = 1.0, temper_delta: bool = False, strategy: str = "entropy",
    alpha_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch residual context. Shapes: logits [N, V], embed_weight [V', D], mask_embed [D].

    Returns (embeds [N, D] in embed_weight's dtype, alpha [N] float32).
    """
    z = logits.detach().float()
    table = embed_weight.detach()[:z.shape[1]].float()
    alpha = reference_alpha(z, t_res, strategy, alpha_scale)
    p = torch.softmax(tempered_shifted_logits(z, t_res if temper_delta else 1.0), dim=-1)
    return _mixed(alpha, mask_embed, p @ table, embed_weight.dtype)


def residual_context_top_k_reference(
    logits: torch.Tensor, embed_weight: torch.Tensor, mask_embed: torch.Tensor,
    t_res: float = 1.0, temper_delta: bool = False, strategy: str = "entropy",
    alpha_scale: float = 1.0, residual_top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch top-k residual context (see the module docstring); None or k >= V is exact.

    Written independently of the fast path: full softmax, a stable sort for the top k, and the
    tail's mean row taken from the tail rows themselves. Returns (embeds [N, D] in
    embed_weight's dtype, alpha [N] float32).
    """
    vocab = logits.shape[1]
    k = vocab if residual_top_k is None else min(int(residual_top_k), vocab)
    z = logits.detach().float()
    table = embed_weight.detach()[:vocab].float()
    alpha = reference_alpha(z, t_res, strategy, alpha_scale)
    p = torch.softmax(tempered_shifted_logits(z, t_res if temper_delta else 1.0), dim=-1)
    # stable descending sort: among equal logits the lower column comes first
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    head = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    head.scatter_(1, order[:, :k], True)
    p_head = torch.where(head, p, torch.zeros_like(p))
    p_tail = torch.where(head, torch.zeros_like(p), p)
    delta = p_head @ table
    if k < vocab:
        tail_mean = (~head).float() @ table / (vocab - k)  # [N, D]: each row's own tail
        delta = delta + p_tail.sum(-1, keepdim=True) * tail_mean
    return _mixed(alpha, mask_embed, delta, embed_weight.dtype)
