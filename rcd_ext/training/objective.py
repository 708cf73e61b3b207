"""The training objective of both stages (Algorithm 1), as plain functions.

Stage `seqd`: masked-diffusion SFT. Per sequence t ~ U(eps, 1); each response token is masked
with probability t (the prompt never is); the loss is the cross-entropy over masked tokens
weighted by 1/t, summed and divided by the number of response tokens in the batch.

Stage `rcd`: the same loss, but every masked position of the target's input carries the
residual (1 - alpha) E[M] + alpha * softmax(z) E, with z the logits of a *source* forward:
- `same`: the frozen reference on the same noisy input (the paper);
- `previous-step`: the reference on a more-masked copy, t' = t + u (1 - t), u ~ U(0, 1)
  (each still-visible response token masked with probability u), which imitates the previous
  denoising step that inference feeds back;
- `self`: a no-grad forward of the target itself on that more-masked copy;
- `dirichlet`: no forward, logits log p0 with p0 ~ Dirichlet(c 1_V) drawn per position (the
  paper's v2 first residual, which needs no reference model; inference's `init="dirichlet"`);
- `unroll`: the target's own decoding loop (no grad) runs k steps from the noisy input, as
  inference does, and the training step is its next step, on its state and residual (on-policy;
  `rcd_ext.training.unroll`).
alpha is the normalised entropy of softmax(z) (t_res = 1), E the *target's* input embedding
table. Rows drawn into `no_residual_fraction` keep plain [M] inputs, so a cold start stays in
distribution. The residual is an input: no gradient flows through it or the source forward.

Injection goes through a forward hook on the target's input-embedding module, so the table is
read inside the forward (where FSDP has gathered it) and any model with
`get_input_embeddings()` works, whether or not it takes `inputs_embeds`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from rcd_ext.ops import residual_context
from rcd_ext.options import REFERENCE_SOURCES, RESIDUAL_SOURCES
from rcd_ext.residual import dirichlet_logits
from rcd_ext.training.unroll import as_noise_fields, draw_unroll_steps, unroll

__all__ = ["REFERENCE_SOURCES", "RESIDUAL_SOURCES", "Noise", "diffusion_loss", "draw_noise",
           "injected_residual", "masked_diffusion_loss", "model_logits"]


@dataclass
class Noise:
    """The random draws of one training step. B rows, L positions.

    t: [B] masking rate; masked: [B, L] bool, response positions masked at rate t;
    u: [B] extra-mask share for the more-masked copy; extra: [B, L] bool, positions masked in
    the copy on top of `masked`; residual: [B] bool, rows that get a residual (False = plain [M]).
    """

    t: torch.Tensor
    masked: torch.Tensor
    u: torch.Tensor
    extra: torch.Tensor
    residual: torch.Tensor


def draw_noise(response_mask: torch.Tensor, eps: float = 1e-3, no_residual_fraction: float = 0.0,
               generator: torch.Generator | None = None) -> Noise:
    """Draw t, the masks and the residual/no-residual split for a batch.

    Args:
        response_mask: [B, L] bool, the positions the loss covers (response, not padding).
        eps: t ~ U(eps, 1), so 1/t stays bounded.
        no_residual_fraction: probability that a row is trained with plain [M] inputs.
        generator: None draws from the global RNG (which `transformers.Trainer` checkpoints
            and restores, so a resumed run draws the same noise).
    """
    device = response_mask.device
    batch, length = response_mask.shape

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    # Every draw happens for every source so that the noise of a step does not depend on the
    # residual source (a SeqD run and an RCD run with the same seed see the same masks).
    t = eps + (1.0 - eps) * uniform(batch)
    masked = (uniform(batch, length) < t[:, None]) & response_mask
    u = uniform(batch)
    extra = (uniform(batch, length) < u[:, None]) & response_mask & ~masked
    residual = uniform(batch) >= no_residual_fraction
    return Noise(t=t, masked=masked, u=u, extra=extra, residual=residual)


def masked_diffusion_loss(logits: torch.Tensor, input_ids: torch.Tensor, noise: Noise,
                          response_mask: torch.Tensor) -> torch.Tensor:
    """1/t-weighted masked cross-entropy, normalised by the number of response tokens.

    Args:
        logits: [B, L, V] target logits; input_ids: [B, L] clean tokens;
        response_mask: [B, L] bool.
    Returns a scalar.
    """
    cross_entropy = F.cross_entropy(logits.float().transpose(1, 2), input_ids, reduction="none")
    weighted = cross_entropy * noise.masked / noise.t[:, None]
    # Normalising by response tokens (not masked tokens) keeps the 1/t weighting an unbiased
    # estimate of the per-token ELBO, as LLaDA's SFT does.
    return weighted.sum() / response_mask.sum().clamp(min=1)


@contextmanager
def injected_residual(model: nn.Module, positions: torch.Tensor,
                      source_logits: torch.Tensor | Callable[[int], torch.Tensor],
                      mask_id: int) -> Iterator[None]:
    """Inside the block, `model`'s input embeddings at `positions` are the residual.

    Args:
        positions: [B, L] bool, where to inject (masked positions of rows with a residual).
        source_logits: [B, L, V] logits of the source forward (only rows at `positions` used),
            or a function of V giving the [N, V] logits of the N positions, called once, inside
            the first forward (where FSDP has gathered the table, whose rows give V).
        mask_id: id of [M] (its row of the table is E[M]).
    """
    inner = model
    while not hasattr(inner, "get_input_embeddings") and hasattr(inner, "module"):
        inner = inner.module  # DDP / FSDP / DeepSpeed wrappers hold the model as .module
    embedding = inner.get_input_embeddings()
    drawn: list[torch.Tensor] = []  # a recomputed forward (checkpointing) reuses the first draw

    def source_rows(vocab: int) -> torch.Tensor:
        if not drawn:
            drawn.append(source_logits(vocab) if callable(source_logits)
                         else source_logits[positions])
        return drawn[0]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        table = module.weight
        rows = source_rows(table.shape[0])  # [N, V]
        if rows.shape[0] == 0:
            return output
        embeds, _ = residual_context(rows, table, table[mask_id], t_res=1.0, strategy="entropy")
        output = output.clone()
        output[positions] = embeds.to(output.dtype)
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def model_logits(model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, V] logits of `model` on `input_ids` (attention_mask passed when given)."""
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    output = model(input_ids=input_ids, **kwargs)
    return output.logits if hasattr(output, "logits") else output[0]


def diffusion_loss(model: nn.Module, batch: dict[str, torch.Tensor], noise: Noise, *,
                   mask_id: int, stage: str = "seqd", reference: nn.Module | None = None,
                   residual_source: str = "previous-step",
                   dirichlet_concentration: float = 1.0, unroll_steps: int = 4,
                   unroll_fraction: float = 1.0, unroll_init: str = "dirichlet",
                   unroll_commits: str = "truth") -> torch.Tensor:
    """The loss of one batch for stage "seqd" or "rcd" (see the module docstring).

    Args:
        model: the target being trained.
        batch: "input_ids" [B, L] clean tokens, "response_mask" [B, L] bool, optional
            "attention_mask" [B, L].
        noise: from `draw_noise`.
        reference: frozen reference (stage "rcd" with source "same"/"previous-step").
        dirichlet_concentration: c of source "dirichlet" (drawn from the global RNG, which
            `transformers.Trainer` checkpoints, so a resumed run draws the same residuals).
        unroll_steps, unroll_fraction, unroll_init, unroll_commits: source "unroll"
            (`DiffusionArguments`).
    Returns a scalar.
    """
    input_ids, response_mask = batch["input_ids"], batch["response_mask"].bool()
    attention_mask = batch.get("attention_mask")
    noisy = input_ids.masked_fill(noise.masked, mask_id)
    if stage == "seqd":
        logits = model_logits(model, noisy, attention_mask)
        return masked_diffusion_loss(logits, input_ids, noise, response_mask)
    if stage != "rcd":
        raise ValueError(f"stage must be 'seqd' or 'rcd', got {stage!r}")
    if residual_source not in RESIDUAL_SOURCES:
        raise ValueError(f"residual_source must be one of {RESIDUAL_SOURCES}, "
                         f"got {residual_source!r}")
    if residual_source == "unroll":
        return _unrolled_loss(model, input_ids, noisy, noise, response_mask, attention_mask,
                              mask_id=mask_id, steps=draw_unroll_steps(unroll_steps,
                                                                       unroll_fraction),
                              init=unroll_init, concentration=dirichlet_concentration,
                              truth=input_ids if unroll_commits == "truth" else None)
    positions = noise.masked & noise.residual[:, None]
    if residual_source == "dirichlet":
        count = int(positions.sum())

        def source_logits(vocab: int) -> torch.Tensor:
            return dirichlet_logits(count, vocab, dirichlet_concentration,
                                    device=positions.device)
    else:
        source_logits = _source_forward_logits(noisy, noise, mask_id, attention_mask,
                                               model if residual_source == "self" else reference,
                                               residual_source)
    with injected_residual(model, positions, source_logits, mask_id):
        logits = model_logits(model, noisy, attention_mask)
    return masked_diffusion_loss(logits, input_ids, noise, response_mask)


def _source_forward_logits(noisy: torch.Tensor, noise: Noise, mask_id: int,
                           attention_mask: torch.Tensor | None, source: nn.Module | None,
                           residual_source: str) -> torch.Tensor:
    """[B, L, V] no-grad logits of the source model on its input (see the module docstring)."""
    if source is None:
        raise ValueError(f"residual source {residual_source!r} needs a reference model")
    source_input = noisy
    if residual_source != "same":
        source_input = noisy.masked_fill(noise.extra, mask_id)
    with torch.no_grad():
        return model_logits(source, source_input, attention_mask)


def _unrolled_loss(model: nn.Module, input_ids: torch.Tensor, noisy: torch.Tensor, noise: Noise,
                   response_mask: torch.Tensor, attention_mask: torch.Tensor | None, *,
                   mask_id: int, steps: int, init: str, concentration: float,
                   truth: torch.Tensor | None) -> torch.Tensor:
    """Source "unroll": k steps of the target's own loop, then the training step on its state."""
    state = unroll(model, noisy, noise.masked, noise.residual, response_mask, steps,
                   mask_id=mask_id, init=init, concentration=concentration,
                   attention_mask=attention_mask, truth=truth, forward=model_logits,
                   inject=injected_residual)
    if state.residual_logits is None:
        logits = model_logits(model, state.input_ids, attention_mask)
    else:
        with injected_residual(model, state.positions, state.residual_logits, mask_id):
            logits = model_logits(model, state.input_ids, attention_mask)
    scored = replace(noise, **as_noise_fields(state, noise.t, noise.residual))
    return masked_diffusion_loss(logits, input_ids, scored, response_mask)
