"""RCD for SDAR's `block_diffusion_generate` (JetAstra/SDAR `generate.py`) and, through an
input-embedding hook, for engines whose forward takes no embeddings (JetEngine, Fast-dLLM v2's
`batch_sample`, the D2F vLLM engine).

SDAR (HF remote code) decodes one block at a time over a `DynamicCache`: each step calls
`model(cur_x, attention_mask=..., position_ids=..., past_key_values=..., use_cache=True,
store_kv=False)` on the block alone, and a finished block is written to the cache by one more
call with `store_kv=True` (no masks left in it). The wrapper reads absolute positions from
`position_ids`, so `rcd_sampler` only wraps the model; the mask id (151669) is the sampler's
`mask_id` argument. The paper's SDAR setting is init="cold".

    import generate                                  # SDAR's generate.py
    from rcd_ext.integrations.sdar import patch_sdar
    patch_sdar(generate)
    x = generate.block_diffusion_generate(model, prompt, mask_id=151669, gen_length=256,
                                          block_length=4, denoising_steps=4, rcd=True)

`EmbeddingHookRCD` (re-exported from `rcd_ext.integrations.embedding_hook`) is the piece for
engines that never take `inputs_embeds`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Callable
from typing import Any

from torch import nn

from rcd_ext.integrations.embedding_hook import EmbeddingHookRCD  # noqa: F401 (re-export)
from rcd_ext.integrations.engine_patching import (
    RCDOptions,
    SamplerPatch,
    bound_arguments,
    build_rcd_model,
    unpatched,
)

SDAR_MASK_ID = 151669


def rcd_block_diffusion_generate(sampler: Callable[..., Any],
                                 patch: SamplerPatch) -> Callable[..., Any]:
    """SDAR's `block_diffusion_generate(model, prompt, mask_id, ...)` with keyword-only RCD
    extras. `prompt` is SDAR's tokenizer output (a dict with 'input_ids' [1, Lp]) or ids."""
    signature = inspect.signature(sampler)

    @functools.wraps(sampler)
    def sampler_with_rcd(model: nn.Module, prompt: Any, *args: Any, **kwargs: Any) -> Any:
        options, kwargs = patch.call_options(kwargs)
        if not options.rcd:
            return sampler(model, prompt, *args, **kwargs)
        mask_id = bound_arguments(signature, model, prompt, *args, **kwargs)["mask_id"]
        ids = prompt["input_ids"] if isinstance(prompt, dict) else prompt
        # only the block being decoded is ever given with masks: inject wherever masked
        rcd_model = build_rcd_model(model, options, mask_id=int(mask_id),
                                    gen_start=int(ids.shape[1]), block_length=None,
                                    scope="all")
        patch.last_rcd_model = rcd_model
        return sampler(rcd_model, prompt, *args, **kwargs)

    sampler_with_rcd.__rcd_original__ = sampler  # type: ignore[attr-defined]
    return sampler_with_rcd


def patch_sdar(generate_module: types.ModuleType | str = "generate",
               **options: Any) -> SamplerPatch:
    """Patch `block_diffusion_generate` of SDAR's generate module (in place, reversible)."""
    module = (importlib.import_module(generate_module) if isinstance(generate_module, str)
              else generate_module)
    patch = SamplerPatch(options=RCDOptions().updated(options))
    original = unpatched(module.block_diffusion_generate)
    patch.replace(module, "block_diffusion_generate",
                  rcd_block_diffusion_generate(original, patch), original)
    return patch


