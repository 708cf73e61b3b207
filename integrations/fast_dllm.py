"""RCD as a drop-in flag for Fast-dLLM (NVlabs/Fast-dLLM, Apache-2.0): LLaDA and Dream paths.

LLaDA (`llada/generate.py`, 2025, and `v1/llada/generate.py`, 2026): every sampler
`f(model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
threshold[, factor])` returning `(x, nfe)` gets keyword-only extras (`rcd=`, `ref_model=`,
`t_res=`, `init=`, `suffix=`, ...). With RCD on, the sampler runs unchanged on an
`rcd_ext.wrapper.RCDModel` around the model: the wrapper reads the absolute positions of each
call (full `x`; `x[:, s:]` over a prefix cache of length s; `x[:, s:e]` with the dual cache's
`replace_position`), injects the previous step's residuals at masked positions of the current
block and keeps this step's. With RCD off the original function runs with the original model.

    import generate                                   # Fast-dLLM's llada/generate.py
    from rcd_ext.integrations.fast_dllm import patch_fast_dllm
    patch_fast_dllm(generate, t_res=0.92)             # also rebinds eval_llada / chat imports
    x, nfe = generate.generate_with_dual_cache(model, prompt, 128, 128, 64, threshold=0.9)
    x, nfe = generate.generate_with_dual_cache(model, prompt, 128, 128, 64, rcd=False)  # SeqD

Dream (`dream/model/generation_utils_block.py`): `DreamGenerationMixin.diffusion_generate` is
bound to the model with `types.MethodType` and calls the model as `self(x, attention_mask,
tok_idx, ...)`; `patch_fast_dllm_dream` replaces it (on the mixin class before the model is
bound, or on a model instance) by a version that routes `self(...)` through the wrapper for
the call. Dream's logits are shifted by one; the wrapper's Dream adapter takes residuals after
the same shift the sampler applies.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rcd_ext.integrations.engine_patching import (
    OPTION_NAMES,
    RCDOptions,
    SamplerPatch,
    bound_arguments,
    build_rcd_model,
    rebind,
    swapped_forward,
    unpatched,
)

LLADA_SAMPLERS = ("generate", "generate_with_prefix_cache", "generate_with_dual_cache")
DREAM_DEFAULT_BLOCK_LENGTH = 32  # diffusion_generate's own default (kwargs.get("block_length", 32))


def _with_rcd_signature(function: Callable[..., Any], original: Callable[..., Any]) -> None:
    # show the original parameters plus the keyword-only extras in help() and inspect
    params = [p for p in inspect.signature(original).parameters.values()
              if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extras = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
              for name in OPTION_NAMES]
    function.__signature__ = inspect.Signature(params + extras)  # type: ignore[attr-defined]


def rcd_llada_sampler(sampler: Callable[..., Any], patch: SamplerPatch) -> Callable[..., Any]:
    """`sampler` (a Fast-dLLM LLaDA sampler) with keyword-only RCD extras.

    Returns a function with the sampler's signature plus `rcd=`, `ref_model=`, residual
    options and `suffix=` (None: the patch's default). Output as the sampler's: `(x [B, L],
    nfe)`; with `rcd=False` it is the sampler's own call on the unwrapped model.
    """
    signature = inspect.signature(sampler)

    @functools.wraps(sampler)
    def sampler_with_rcd(model: nn.Module, prompt: torch.Tensor, *args: Any,
                         **kwargs: Any) -> Any:
        options, kwargs = patch.call_options(kwargs)
        if not options.rcd:
            return sampler(model, prompt, *args, **kwargs)
        # block boundaries and the mask id exactly as the sampler will use them
        arguments = bound_arguments(signature, model, prompt, *args, **kwargs)
        rcd_model = build_rcd_model(model, options, mask_id=int(arguments["mask_id"]),
                                    gen_start=int(prompt.shape[1]),
                                    block_length=int(arguments["block_length"]))
        patch.last_rcd_model = rcd_model
        return sampler(rcd_model, prompt, *args, **kwargs)

    del sampler_with_rcd.__wrapped__  # inspect shows __signature__, not the original's
    _with_rcd_signature(sampler_with_rcd, sampler)
    sampler_with_rcd.__rcd_original__ = sampler  # type: ignore[attr-defined]
    return sampler_with_rcd


def _is_llada_sampler(value: Any) -> bool:
    # Fast-dLLM's samplers all start (model, prompt, ...) and take block_length and mask_id
    # (v1 also has generate_prefix_cache_variable and generate_streaming_blocks)
    if not inspect.isfunction(value):
        return False
    params = list(inspect.signature(value).parameters)
    return params[:2] == ["model", "prompt"] and {"block_length", "mask_id"} <= set(params)


def patch_fast_dllm(
    generate_module: types.ModuleType | str = "generate",
    *,
    names: tuple[str, ...] | None = None,
    **options: Any,
) -> SamplerPatch:
    """Turn Fast-dLLM's LLaDA samplers into RCD samplers (in place, reversible).

    Args:
        generate_module: the imported `generate` module (or its import name; the engine's
            scripts import it as top-level `generate` from `llada/` or `v1/llada/`).
        names: sampler names to patch (default: every `(model, prompt, ...)` function with
            `block_length` and `mask_id`, which covers the three documented ones).
        **options: defaults of `RCDOptions` (rcd=True, ref_model, t_res, init, suffix, ...).
    Returns a `SamplerPatch`; names already imported elsewhere (`from generate import
    generate_with_dual_cache` in eval_llada.py / chat.py) are rebound too.
    """
    module = (importlib.import_module(generate_module) if isinstance(generate_module, str)
              else generate_module)
    patch = SamplerPatch(options=RCDOptions().updated(options))
    if names is None:
        names = tuple(name for name, value in vars(module).items()
                      if _is_llada_sampler(getattr(value, "__rcd_original__", value)))
    missing = [name for name in LLADA_SAMPLERS if name not in names]
    if names == () or (missing and len(missing) == len(LLADA_SAMPLERS)):
        raise ValueError(f"{module.__name__} has none of Fast-dLLM's samplers "
                         f"{LLADA_SAMPLERS}: pass Fast-dLLM's llada/generate.py module")
    for name in names:
        current = getattr(module, name)
        original = unpatched(current)  # re-patching: start over
        patched = rcd_llada_sampler(original, patch)
        patch.originals[name] = original
        setattr(module, name, patched)
        rebound = rebind(current, patched)
        patch.rebound += [r for r in rebound if not r.startswith(f"{module.__name__}.")]

        def restore(patched: Any = patched, original: Any = original) -> None:
            rebind(patched, original)

        patch._restore.append(restore)
    return patch


def rcd_diffusion_generate(
    diffusion_generate: Callable[..., Any],
    patch: SamplerPatch,
    default_block_length: int = DREAM_DEFAULT_BLOCK_LENGTH,
) -> Callable[..., Any]:
    """Fast-dLLM Dream's `diffusion_generate(self, inputs, generation_config, **kwargs)` with
    keyword-only RCD extras; `self` is the Dream model. Returns what the original returns."""

    @functools.wraps(diffusion_generate)
    def diffusion_generate_with_rcd(self: nn.Module, inputs: torch.Tensor | None = None,
                                    generation_config: Any = None, **kwargs: Any) -> Any:
        options, kwargs = patch.call_options(kwargs)
        if not options.rcd:
            return diffusion_generate(self, inputs, generation_config, **kwargs)
        config = generation_config or getattr(self, "generation_config", None)
        mask_id = kwargs.get("mask_token_id", getattr(config, "mask_token_id", None))
        block_length = kwargs.get("block_length", default_block_length)
        rcd_model = build_rcd_model(self, options, mask_id=mask_id,
                                    gen_start=int(inputs.shape[1]),
                                    block_length=None if block_length is None
                                    else int(block_length))
        patch.last_rcd_model = rcd_model
        with swapped_forward(self, rcd_model):
            return diffusion_generate(self, inputs, generation_config, **kwargs)

    diffusion_generate_with_rcd.__rcd_original__ = diffusion_generate  # type: ignore[attr-defined]
    return diffusion_generate_with_rcd


def patch_fast_dllm_dream(
    target: type | nn.Module | types.ModuleType | str = "model.generation_utils_block",
    *,
    default_block_length: int = DREAM_DEFAULT_BLOCK_LENGTH,
    **options: Any,
) -> SamplerPatch:
    """Turn Fast-dLLM's Dream block sampler into an RCD sampler (in place, reversible).

    target: `DreamGenerationMixin` (or its module, or the module's import name): patch the
        class before the engine binds it onto the model (`types.MethodType(DreamGenerationMixin
        .diffusion_generate, model)` in dream/eval.py picks up the patched function); or a
        model instance whose `diffusion_generate` is already bound: rebinds that instance.
    **options: defaults of `RCDOptions`.
    """
    if isinstance(target, str):
        target = importlib.import_module(target)
    if isinstance(target, types.ModuleType):
        target = target.DreamGenerationMixin
    patch = SamplerPatch(options=RCDOptions().updated(options))
    if isinstance(target, nn.Module):
        original = unpatched(target.diffusion_generate)
        patched = rcd_diffusion_generate(original, patch, default_block_length)
        patch.replace(target, "diffusion_generate", types.MethodType(patched, target), original)
    else:
        original = unpatched(target.__dict__["diffusion_generate"])
        patched = rcd_diffusion_generate(original, patch, default_block_length)
        patch.replace(target, "diffusion_generate", patched, original)
    return patch
