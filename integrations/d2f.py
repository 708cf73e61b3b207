"""RCD as a drop-in flag for D2F (zhijie-group/Discrete-Diffusion-Forcing, MIT): the Hugging
Face block samplers of `D2F-eval/eval_llada.py` and `eval_dream.py`.

D2F decodes several blocks at once: a block of masks is appended while the previous one is
still being decoded, finished blocks go into the K/V cache (`update_kvcache`), and each step
runs the model on `x_t[:, first_uncached_or_active:]`. The wrapper therefore
- injects at every masked position it is given (scope "all": only blocks in flight are ever in
  `x_t`), keeping residuals per absolute position (cache length + offset), so threshold
  decoding with per-block step counts needs no bookkeeping of its own;
- gives a new block's positions, which have no logits yet, the configured init (cold: plain
  [M]; reference / self / dirichlet);
- for Dream, takes residuals after D2F's own shift (`D2FDreamAdapter`);
- calls the base model under a PEFT wrapper directly (D2F loads LoRA with `PeftModel`, whose
  `forward(*args, **kwargs)` hides the argument names; the LoRA layers live inside the base
  model, so the base model's forward is the same computation).

    import eval_llada                                   # D2F-eval/eval_llada.py
    from rcd_ext.integrations.d2f import patch_d2f
    patch_d2f(eval_llada.DreamLoRA, t_res=0.92)  # the registered lm-eval class
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rcd_ext.integrations.engine_patching import (
    RCDOptions,
    SamplerPatch,
    build_rcd_model,
    unpatched,
)
from rcd_ext.models.adapters import ModelAdapter, get_adapter
from rcd_ext.wrapper import unwrap_peft


class D2FDreamAdapter(ModelAdapter):
    """Dream under D2F: logits shifted by one, and the first position of a slice scored as
    D2F's `_shift_logits` does: by `last_logits`, the row `update_kvcache - 1` of the most
    recent cache-updating forward (the prediction for the first position after the cache),
    or constant logits (uniform) before any update. `update_kvcache` of the coming forward is
    set by `watch` (a forward pre-hook on the model)."""

    last_logit: torch.Tensor | None = None
    update_kvcache: int = 0

    def watch(self, model: nn.Module) -> Any:
        """Record each forward's `update_kvcache`; returns the hook handle."""

        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.update_kvcache = int(kwargs.get("update_kvcache") or 0)

        return model.register_forward_pre_hook(before, with_kwargs=True)

    def logits(self, output: Any) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output[0]
        if self.update_kvcache > 0:
            self.last_logit = logits[:, self.update_kvcache - 1:self.update_kvcache]
        first = self.last_logit if self.last_logit is not None else torch.ones_like(
            logits[:, :1])
        return torch.cat([first.to(logits.dtype), logits[:, :-1]], dim=1)



def d2f_adapter(model: nn.Module, mask_id: int) -> ModelAdapter:
    """The wrapper's adapter for a D2F model (LLaDA: the family's own; a family with shifted
    logits, Dream: D2F's shift)."""
    adapter = get_adapter(model, mask_id=mask_id)
    if adapter.shift_logits:
        adapter = D2FDreamAdapter(model=model, mask_id=adapter.mask_id, eos_id=adapter.eos_id,
                                  pad_id=adapter.pad_id, family=adapter.family,
                                  shift_logits=True)
        adapter.last_logit, adapter.update_kvcache = None, 0
    return adapter


def rcd_generate_block_single(method: Callable[..., Any],
                              patch: SamplerPatch) -> Callable[..., Any]:
    """D2F's `_generate_block_single(self, prompt [1, Lp])` with keyword-only RCD extras.

    With RCD on, `self.model` is an `RCDModel` around the (PEFT-unwrapped) model for the
    duration of the call. Returns what the original returns."""

    @functools.wraps(method)
    def generate_block_single_with_rcd(self: Any, prompt: torch.Tensor, *args: Any,
                                       **kwargs: Any) -> Any:
        options, kwargs = patch.call_options(kwargs)
        if not options.rcd:
            return method(self, prompt, *args, **kwargs)
        model = self.model
        target = unwrap_peft(model)
        adapter = d2f_adapter(target, int(self.mask_token_id))
        rcd_model = build_rcd_model(target, options, mask_id=int(self.mask_token_id),
                                    gen_start=int(prompt.shape[1]), block_length=None,
                                    scope="all", adapter=adapter)
        patch.last_rcd_model = rcd_model
        handle = adapter.watch(target) if isinstance(adapter, D2FDreamAdapter) else None
        self.model = rcd_model
        try:
            return method(self, prompt, *args, **kwargs)
        finally:
            self.model = model
            if handle is not None:
                handle.remove()

    generate_block_single_with_rcd.__rcd_original__ = method  # type: ignore[attr-defined]
    return generate_block_single_with_rcd


def patch_d2f(target: type | Any, **options: Any) -> SamplerPatch:
    """Turn a D2F lm-eval class (or one instance) into an RCD sampler (in place, reversible).

    target: the class that defines `_generate_block_single` (patch it before lm-eval builds the
        model object), or an instance.
    **options: defaults of `RCDOptions` (rcd=True, ref_model, t_res, init, ...; `suffix` does
        not apply: every block in flight is decoded).
    """
    patch = SamplerPatch(options=RCDOptions().updated(options))
    if isinstance(target, type):
        current = getattr(target, "_generate_block_single", None)
        if current is None:
            raise ValueError(f"{target.__name__} has no _generate_block_single: pass D2F's "
                             "lm-eval model class (eval_llada.py / eval_dream.py)")
        original = unpatched(current)
        patch.replace(target, "_generate_block_single",
                      rcd_generate_block_single(original, patch), original)
    else:
        original = unpatched(target._generate_block_single)
        patch.replace(target, "_generate_block_single",
                      types.MethodType(rcd_generate_block_single(original, patch), target),
                      original)
    return patch
