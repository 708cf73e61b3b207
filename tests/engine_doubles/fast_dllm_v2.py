"""A from-scratch double of Fast-dLLM v2: a block-diffusion model whose forward takes token ids
only, and `batch_sample` with v2's public signature and model calls.

Conventions reproduced: `self.forward(input_ids=..., use_cache=True, past_key_values=cache,
update_past_key_values=...)` called directly (not through `__call__`); committed blocks are
appended to the cache by an update call on the finished block; with `use_block_cache` a step
runs the whole block and returns `block_past_key_values` while the small block's first token is
masked in any row, later steps run the small block alone with
`replace_position=<offset of the small block>`; logits are
shifted by one (`cat([logits[:, :1], logits[:, :-1]])`). Equal prompt lengths only.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.engine_doubles.models import Call, _DoubleBase


class BlockCache:
    """Committed K/V (B, H, L, d) with `get_seq_length()`, like a DynamicCache."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class V2Double(_DoubleBase):
    model_type = "fast_dllm_v2"

    def forward(self, input_ids: torch.LongTensor, past_key_values: BlockCache | None = None,
                use_cache: bool = False, update_past_key_values: bool = False,
                block_size: int | None = None, use_block_cache: bool = False,
                block_past_key_values: torch.Tensor | None = None,
                replace_position: int | None = None) -> SimpleNamespace:
        embeds = self.core.wte(input_ids)  # hooks on the embedding module see this call
        batch, length, _ = embeds.shape
        start = 0 if past_key_values is None else past_key_values.get_seq_length()
        if block_past_key_values is not None:
            start += replace_position
        positions = (start + torch.arange(length))[None].expand(batch, length)
        hidden, q, k, v = self.core.qkv_heads(embeds, positions)
        keys, values = k, v
        if past_key_values is not None and past_key_values.k is not None:
            keys = torch.cat([past_key_values.k, k], 2)
            values = torch.cat([past_key_values.v, v], 2)
        logits = self.core.logits(hidden, q, keys, values)
        self.calls.append(Call(positions.clone(), input_ids.clone(), embeds.clone(),
                               logits.clone()))
        if update_past_key_values:
            if past_key_values is None:
                past_key_values = BlockCache()
            past_key_values.k, past_key_values.v = keys, values
        return SimpleNamespace(logits=logits, past_key_values=past_key_values,
                               block_past_key_values=(k, v) if use_block_cache else None)

    @torch.no_grad()
    def batch_sample(self, input_ids, tokenizer, block_size, max_new_tokens, small_block_size,
                     min_len, seq_len, mask_id=151665, threshold=0.95, stop_token=151645,
                     use_block_cache=False, top_p=0.95, temperature=0.0):
        """Greedy v2-style decoding; returns x_t [B, Lp + max_new_tokens]."""
        output = self.forward(input_ids=input_ids, use_cache=True,
                              update_past_key_values=True, block_size=block_size)
        cache = output.past_key_values
        x_t = input_ids
        for _ in range(max_new_tokens // block_size):
            x_t = torch.cat([x_t, torch.full((x_t.shape[0], block_size), mask_id)], dim=1)
            block_cache = None
            for small_start in range(0, block_size, small_block_size):
                start = x_t.shape[1] - block_size + small_start
                end = start + small_block_size
                while (x_t[:, start:end] == mask_id).any():
                    # as v2: the whole block again while the small block's first token is
                    # masked in any row, then the small block alone
                    if use_block_cache and block_cache is not None and \
                            not (x_t[:, start] == mask_id).any():
                        logits = self.forward(input_ids=x_t[:, start:end], use_cache=True,
                                              past_key_values=cache,
                                              update_past_key_values=False,
                                              use_block_cache=True,
                                              block_past_key_values=block_cache,
                                              replace_position=small_start).logits
                        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                    else:
                        output = self.forward(input_ids=x_t[:, -block_size:], use_cache=True,
                                              past_key_values=cache,
                                              update_past_key_values=False,
                                              use_block_cache=use_block_cache)
                        block_cache = output.block_past_key_values
                        logits = torch.cat([output.logits[:, :1], output.logits[:, :-1]], 1)
                        logits = logits[:, small_start:small_start + small_block_size]
                    logits = logits.clone()
                    logits[..., mask_id] = -torch.inf  # never "commit" the mask token
                    confidence, x1 = torch.softmax(logits.double(), -1).max(-1)
                    masked = x_t[:, start:end] == mask_id
                    confidence = torch.where(masked, confidence, torch.tensor(-1.0).double())
                    unmask = masked & (confidence > threshold)
                    unmask[torch.arange(x_t.shape[0]), confidence.argmax(-1)] = True
                    unmask &= masked
                    x_t[:, start:end][unmask] = x1[unmask]
            self.forward(input_ids=x_t[:, -block_size:], use_cache=True, past_key_values=cache,
                         update_past_key_values=True, block_size=block_size)
        return x_t
