"""Which masked tokens a denoising step commits, and what they become.

Three small parts, each tested on its own:
- `transfer_schedule`: the linear schedule, how many tokens each step must commit at least;
- `sample_tokens`: a candidate token and its confidence at every position (greedy at
  temperature 0; otherwise temperature / top-k / top-p sampling);
- `select_commits`: policy "fixed" (the `count` most confident) or "threshold" (every candidate
  above the confidence threshold, and at least `count`: SDAR's low_confidence_dynamic).
Commitment always uses the model's plain distribution; residuals never change it.
"""

from __future__ import annotations

import torch

POLICIES = ("fixed", "threshold")


def transfer_schedule(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step: [B] masked counts -> [B, steps] long, rows summing to counts.

    Even split; the remainder goes to the first steps.
    """
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    base = torch.div(masked_count, steps, rounding_mode="floor")
    remainder = masked_count - base * steps
    columns = torch.arange(steps, device=masked_count.device)
    return base[:, None] + (columns[None, :] < remainder[:, None]).long()


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """-inf outside the top-k and outside the smallest set with probability mass >= top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens and confidences from logits [B, l, V] -> (tokens [B, l], conf [B, l]).

    Temperature 0: argmax. Otherwise a draw from softmax(top-k/top-p filtered logits /
    temperature). Either way the confidence is the token's probability under the plain
    softmax(logits), as LLaDA's and SDAR's samplers rank candidates.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    logits = logits.float()
    plain = torch.softmax(logits, dim=-1)
    if temperature == 0:
        confidence, tokens = plain.max(-1)
        return tokens, confidence
    probs = torch.softmax(_filter_logits(logits / temperature, top_k, top_p), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    confidence = torch.gather(plain, -1, tokens[..., None]).squeeze(-1)
    return tokens, confidence


def select_commits(
    confidence: torch.Tensor,
    candidates: torch.Tensor,
    count: torch.Tensor,
    *,
    policy: str = "fixed",
    threshold: float | None = None,
) -> torch.Tensor:
    """Positions to commit now: bool [B, l].

    Args:
        confidence: [B, l] confidence of each position's candidate token.
        candidates: [B, l] bool, positions that may be committed (masked, in the block).
        count: [B] long, how many to commit (policy "fixed") or at least (policy "threshold").
        threshold: confidence above which "threshold" commits a candidate.
    """
    if policy not in POLICIES:
        raise ValueError(f"remasking policy must be one of {POLICIES}, got {policy!r}")
    scores = confidence.float().masked_fill(~candidates, float("-inf"))
    count = torch.minimum(count, candidates.sum(1))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(
        order.shape[1], device=order.device).expand_as(order))
    chosen = (rank < count[:, None]) & candidates
    if policy == "threshold":
        if threshold is None:
            raise ValueError("remasking 'threshold' needs a confidence threshold")
        chosen |= candidates & (confidence > threshold)
    return chosen
