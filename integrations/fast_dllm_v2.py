"""RCD for Fast-dLLM v2 (`v2/generation_functions.py`, Apache-2.0): `batch_sample` bound onto a
Qwen2.5 block-diffusion model (`types.MethodType(Fast_dLLM_QwenForCausalLM.batch_sample,
model)` in v2/eval.py).

The v2 model's forward takes token ids only, and `batch_sample` calls `self.forward(...)`
directly (no module `__call__`, so no forward hooks on the model run). RCD therefore goes in
through `EmbeddingHookRCD` on the input-embedding module, and the patched `batch_sample`
swaps the instance's `forward` for one that, per call,
1. finds the absolute positions: the committed-block cache length (`past_key_values`), plus
   `replace_position` (the small-block offset) when `block_past_key_values` is given;
2. announces ids and positions to the hook (which swaps in residuals at masked tokens);
3. stores residuals from the logits after the sampler's own shift
   (`cat([logits[:, :1], logits[:, :-1]])`) for every masked token of the call.
Every masked token of the current block gets its residual (scope "all": only the current
block is ever given with masks). Init: cold only.

    import generation_functions
    from rcd_ext.integrations.fast_dllm_v2 import patch_fast_dllm_v2
    patch_fast_dllm_v2(generation_functions.Fast_dLLM_QwenForCausalLM)   # before eval.py binds
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rcd_ext.integrations.embedding_hook import EmbeddingHookRCD
from rcd_ext.integrations.engine_patching import (
    RCDOptions,
    SamplerPatch,
    bound_arguments,
    swapped_forward,
    unpatched,
)
from rcd_ext.models.adapters import ModelAdapter

V2_MASK_ID = 151665


def call_positions(kwargs: dict[str, Any], batch: int, length: int,
                   device: torch.device) -> torch.Tensor:
    """[B, l] absolute positions of a v2 forward call from its keyword arguments."""
    start = ModelAdapter.cache_length(kwargs.get("past_key_values"))
    if kwargs.get("block_past_key_values") is not None:
        # block-cache steps feed one small block, placed at replace_position inside the block
        start += int(kwargs.get("replace_position") or 0)
    return (start + torch.arange(length, device=device))[None].expand(batch, length)


def rcd_batch_sample(batch_sample: Callable[..., Any],
                     patch: SamplerPatch) -> Callable[..., Any]:
    """v2's `batch_sample(self, input_ids, tokenizer, block_size, ..., mask_id=151665, ...)`
    with keyword-only RCD extras. Returns what the original returns."""
    signature = inspect.signature(batch_sample)

    @functools.wraps(batch_sample)
    def batch_sample_with_rcd(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        options, kwargs = patch.call_options(kwargs)
        if not options.rcd:
            return batch_sample(self, *args, **kwargs)
        arguments = bound_arguments(signature, self, *args, **kwargs)
        hook = EmbeddingHookRCD(self.get_input_embeddings(), int(arguments["mask_id"]), options)
        hook.reset(int(arguments["input_ids"].shape[0]))
        patch.last_hook = hook

        def forward(*f_args: Any, **f_kwargs: Any) -> Any:
            ids = f_kwargs["input_ids"] if "input_ids" in f_kwargs else f_args[0]
            hook.prepare(ids, call_positions(f_kwargs, ids.shape[0], ids.shape[1], ids.device))
            output = self.forward(*f_args, **f_kwargs)  # re-entered: the original forward
            logits = output.logits
            hook.update(torch.cat([logits[:, :1], logits[:, :-1]], dim=1))
            return output

        try:
            with swapped_forward(self, forward):
                return batch_sample(self, *args, **kwargs)
        finally:
            hook.remove()

    batch_sample_with_rcd.__rcd_original__ = batch_sample  # type: ignore[attr-defined]
    return batch_sample_with_rcd


def patch_fast_dllm_v2(target: type | nn.Module, **options: Any) -> SamplerPatch:
    """Patch `batch_sample` on v2's model class (before eval.py binds it) or on a model whose
    `mdm_sample` is already bound (instance: rebinds `mdm_sample`). Reversible."""
    patch = SamplerPatch(options=RCDOptions().updated(options))
    if isinstance(target, type):
        original = unpatched(target.__dict__["batch_sample"])
        patch.replace(target, "batch_sample", rcd_batch_sample(original, patch))
    else:
        original = unpatched(target.mdm_sample)
        patch.replace(target, "mdm_sample",
                      types.MethodType(rcd_batch_sample(original, patch), target))
    patch.originals["batch_sample"] = original
    return patch
