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

`EmbeddingHookRCD` is the piece for engines that never take `inputs_embeds`: a forward hook on
the input-embedding module replaces the rows of masked tokens by their stored residuals; the
engine adapter tells it the absolute positions of the flat token batch before the forward and
hands it the sampler's logits after it.
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

from rcd_ext.integrations.engine_patching import RCDOptions, build_rcd_model, split_options
from rcd_ext.integrations.fast_dllm import SamplerPatch
from rcd_ext.residual import ResidualState

SDAR_MASK_ID = 151669


def rcd_block_diffusion_generate(sampler: Callable[..., Any],
                                 patch: SamplerPatch) -> Callable[..., Any]:
    """SDAR's `block_diffusion_generate(model, prompt, mask_id, ...)` with keyword-only RCD
    extras. `prompt` is SDAR's tokenizer output (a dict with 'input_ids' [1, Lp]) or ids."""
    signature = inspect.signature(sampler)

    @functools.wraps(sampler)
    def sampler_with_rcd(model: nn.Module, prompt: Any, *args: Any, **kwargs: Any) -> Any:
        changes, kwargs = split_options(kwargs)
        options = patch.options.updated(changes)
        if not options.rcd:
            return sampler(model, prompt, *args, **kwargs)
        bound = signature.bind(model, prompt, *args, **kwargs)
        bound.apply_defaults()
        ids = prompt["input_ids"] if isinstance(prompt, dict) else prompt
        # only the block being decoded is ever given with masks: inject wherever masked
        rcd_model = build_rcd_model(model, options, mask_id=int(bound.arguments["mask_id"]),
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
    current = module.block_diffusion_generate
    original = getattr(current, "__rcd_original__", current)
    module.block_diffusion_generate = rcd_block_diffusion_generate(original, patch)
    patch.originals["block_diffusion_generate"] = original

    def restore() -> None:
        module.block_diffusion_generate = original

    patch._restore.append(restore)
    return patch


class EmbeddingHookRCD:
    """RCD through a forward hook on the input-embedding module (no `inputs_embeds` needed).

    Per forward the engine adapter calls `prepare(token_ids, positions)` (flat or [B, l]
    tensors, positions absolute per sequence, `rows` the sequence index of each token for flat
    batches), runs the engine's forward, then `update(logits)` with the logits of the same
    tokens ([N, V] or [B, l, V]). The hook swaps the embedding output at masked tokens for the
    stored residuals; everything else passes unchanged. `reset(batch)` between requests.

    Args:
        embedding: the model's input-embedding module (its weight is the residual table).
        mask_id: the mask token id.
        options: `RCDOptions` (init "cold" only: the hook cannot run extra forwards).
    """

    def __init__(self, embedding: nn.Module, mask_id: int, options: RCDOptions | None = None):
        options = options or RCDOptions()
        if options.init != "cold":
            raise ValueError(f"init={options.init!r} needs extra forwards the embedding hook "
                             "cannot make; use init='cold' (the paper's SDAR setting)")
        self.state = ResidualState(embedding.weight, mask_id, options.residual_config("all"))
        self.mask_id = mask_id
        self.enabled = options.rcd
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.handle = embedding.register_forward_hook(self._hook)

    def reset(self, batch: int = 1) -> None:
        """Forget every residual (new requests)."""
        self.state.reset(batch)

    def prepare(self, token_ids: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None = None) -> None:
        """Announce the tokens of the next forward: ids and absolute positions, [N] or [B, l];
        `rows` [N] the request of each flat token (default 0)."""
        if token_ids.dim() == 1:
            rows = torch.zeros_like(token_ids) if rows is None else rows
        else:
            rows = torch.arange(token_ids.shape[0], device=token_ids.device)[:, None] \
                .expand_as(token_ids)
        self._pending = (token_ids.reshape(-1), positions.reshape(-1).long(), rows.reshape(-1))

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
        if not self.enabled or self._pending is None:
            return None
        ids, positions, rows = self._pending
        flat = output.reshape(-1, output.shape[-1])
        if flat.shape[0] != ids.shape[0]:
            raise ValueError(f"prepare() announced {ids.shape[0]} tokens but the embedding "
                             f"module embedded {flat.shape[0]}")
        masked = ids == self.mask_id
        if not bool(masked.any()):
            return None
        have = stored_at(self.state, rows, positions) & masked
        if not bool(have.any()):
            return None
        flat = flat.clone()
        flat[have] = self.state.embeds[rows[have], positions[have]].to(flat.dtype)
        return flat.view_as(output)

    def update(self, logits: torch.Tensor) -> None:
        """Store this forward's residuals from `logits` ([N, V] or [B, l, V], same tokens as
        the last `prepare`)."""
        if not self.enabled or self._pending is None:
            return
        ids, positions, rows = self._pending
        self._pending = None
        logits = logits.reshape(-1, logits.shape[-1])
        masked = ids == self.mask_id
        known = stored_at(self.state, rows, positions)
        # committed tokens forget their residual; masked ones are overwritten
        self.state.valid[rows[known & ~masked], positions[known & ~masked]] = False
        if bool(masked.any()):
            self.state.write(rows[masked], positions[masked], logits[masked])

    def remove(self) -> None:
        """Detach the hook."""
        self.handle.remove()


def stored_at(state: ResidualState, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[N] bool: whether `state` holds a residual at the (row, absolute position) pairs [N].

    `ResidualState.has_residual` takes [B, l] positions whose row is the batch index; flat
    engine batches need pairs (proposed as a public ResidualState method in docs/engines.md).
    A row beyond the state's batch resets it (new requests)."""
    if positions.numel() == 0:
        return torch.zeros_like(positions, dtype=torch.bool)
    state._ensure(max(state.batch_size, int(rows.max()) + 1), int(positions.max()) + 1)
    return state.valid[rows, positions]
