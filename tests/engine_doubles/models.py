"""Tiny random models with the forward signatures and cache layouts of the engines' models.

All share one attention layer over learned absolute positions, so any error in the absolute
positions the wrapper (or the engine) uses changes the logits. Each model records, per call,
the absolute positions, token ids and input embeddings it received (`calls`).

| double         | forward like                       | cache per layer     | positions from  |
|----------------|------------------------------------|---------------------|-----------------|
| LLaDADouble    | Fast-dLLM LLaDAModelLM (replace)   | (k, v) (B, H, L, d) | cache / replace |
| D2FLLaDADouble | D2F LLaDAModelLM (update_kvcache)  | (k, v) (B, H, L, d) | cache length    |
| DreamDouble    | Fast-dLLM DreamModel, positional   | (k, v) (B, L, H*d)  | ids/cache/repl. |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


@dataclass
class Call:
    """One forward as the model saw it."""

    positions: torch.Tensor  # [B, l] absolute positions
    input_ids: torch.Tensor | None  # [B, l] (None when called with embeddings only)
    embeds: torch.Tensor  # [B, l, D] the embeddings actually used
    logits: torch.Tensor  # [B, l, V]
    kwargs: dict[str, Any] = field(default_factory=dict)


class _AttentionCore(nn.Module):
    """Embedding, one bidirectional attention layer, LM head; random fixed weights."""

    def __init__(self, vocab: int, dim: int, heads: int, max_len: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(max_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)
            parameter.requires_grad_(False)
        self.heads = heads

    def qkv_heads(self, embeds: torch.Tensor, positions: torch.Tensor):
        """hidden [B, l, D] and q, k, v [B, H, l, d] for embeddings at absolute positions."""
        hidden = embeds + self.wpe(positions)
        batch, length, _ = hidden.shape
        q, k, v = self.qkv(hidden).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return hidden, q, k.contiguous(), v.contiguous()

    def logits(self, hidden, q, k, v, allowed=None) -> torch.Tensor:
        """[B, l, V] logits; `allowed` [.., l, L] boolean mask of admissible keys (None: all)."""
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.head(hidden + out.transpose(1, 2).reshape(hidden.shape))


class _DoubleBase(nn.Module):
    model_type = "llada"

    def __init__(self, vocab: int = 48, dim: int = 16, heads: int = 2, max_len: int = 96,
                 seed: int = 0, mask_token_id: int | None = None):
        super().__init__()
        self.core = _AttentionCore(vocab, dim, heads, max_len, seed)
        self.config = SimpleNamespace(model_type=self.model_type, vocab_size=vocab,
                                      mask_token_id=mask_token_id, use_cache=False,
                                      max_position_embeddings=max_len)
        self.calls: list[Call] = []

    @property
    def device(self) -> torch.device:
        return self.core.wte.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.core.wte

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        return self.core.wte(input_ids) if inputs_embeds is None else inputs_embeds

    def _record(self, positions, input_ids, embeds, logits, **kwargs) -> None:
        self.calls.append(Call(positions.clone(), None if input_ids is None else
                               input_ids.clone(), embeds.clone(), logits.clone(), kwargs))


class LLaDADouble(_DoubleBase):
    """Fast-dLLM's LLaDAModelLM conventions: `model(x)`; `model(x[:, s:], past_key_values=
    [(k, v)] * layers, use_cache=True)` (positions continue after the cache); `model(x[:, s:e],
    past_key_values=..., use_cache=True, replace_position=[B, L] bool)` writes K/V in place into
    the given cache at the True columns. Returns an object with .logits, .past_key_values."""

    def forward(self, input_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                attention_bias: torch.Tensor | None = None,
                past_key_values: list | None = None,
                labels: torch.LongTensor | None = None,
                use_cache: bool | None = None,
                output_attentions: bool | None = None,
                output_hidden_states: bool | None = None,
                return_dict: bool | None = None,
                replace_position: torch.Tensor | None = None) -> SimpleNamespace:
        embeds = self._embed(input_ids, inputs_embeds)
        batch, length, _ = embeds.shape
        if replace_position is not None:
            columns = replace_position[0].nonzero()[:, 0]
            positions = columns[None].expand(batch, length)
        else:
            start = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
            positions = (start + torch.arange(length))[None].expand(batch, length)
        hidden, q, k, v = self.core.qkv_heads(embeds, positions)
        if past_key_values is not None:
            past_k, past_v = past_key_values[0]
            if replace_position is not None:
                past_k[:, :, columns] = k  # in place, as Fast-dLLM's dual cache does
                past_v[:, :, columns] = v
                k, v = past_k, past_v
            else:
                k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        logits = self.core.logits(hidden, q, k, v)
        self._record(positions, input_ids, embeds, logits)
        present = [(k, v)] if use_cache else None
        return SimpleNamespace(logits=logits, past_key_values=present)


class D2FLLaDADouble(_DoubleBase):
    """D2F's LLaDAModelLM conventions: `model(seq, attention_bias=..., past_key_values=...,
    use_cache=True, update_kvcache=n)`; with n > 0 the returned cache holds the first n
    positions of cache + seq, else the given cache is returned as it was."""

    def forward(self, input_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                attention_bias: torch.Tensor | None = None,
                past_key_values: list | None = None,
                labels: torch.LongTensor | None = None,
                use_cache: bool | None = None,
                update_kvcache: int = 0,
                output_attentions: bool | None = None,
                output_hidden_states: bool | None = None,
                return_dict: bool | None = None,
                cache_position: Any = None) -> SimpleNamespace:
        embeds = self._embed(input_ids, inputs_embeds)
        batch, length, _ = embeds.shape
        start = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
        positions = (start + torch.arange(length))[None].expand(batch, length)
        hidden, q, k, v = self.core.qkv_heads(embeds, positions)
        if past_key_values is not None:
            k = torch.cat([past_key_values[0][0], k], 2)
            v = torch.cat([past_key_values[0][1], v], 2)
        logits = self.core.logits(hidden, q, k, v)
        self._record(positions, input_ids, embeds, logits, update_kvcache=update_kvcache)
        present = past_key_values
        if use_cache and update_kvcache:
            present = [(k[:, :, :update_kvcache], v[:, :, :update_kvcache])]
        return SimpleNamespace(logits=logits, past_key_values=present)


class DreamDouble(_DoubleBase):
    """Fast-dLLM's DreamModel conventions: called positionally `model(x, attention_mask,
    position_ids, past_key_values=..., use_cache=True[, dual_cache=True, replace_position=...])`
    (attention_mask may be the string "full"); cache per layer (k, v) as (B, L, H*d); the
    logits at i score token i + 1 (the sampler shifts them)."""

    model_type = "Dream"

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: Any = None,
                position_ids: torch.LongTensor | None = None,
                past_key_values: list | None = None,
                inputs_embeds: torch.FloatTensor | None = None,
                use_cache: bool | None = None,
                output_attentions: bool | None = None,
                output_hidden_states: bool | None = None,
                return_dict: bool | None = None,
                cache_position: Any = None,
                dual_cache: bool = False,
                replace_position: torch.Tensor | None = None) -> SimpleNamespace:
        embeds = self._embed(input_ids, inputs_embeds)
        batch, length, dim = embeds.shape
        if replace_position is not None:
            columns = replace_position[0].nonzero()[:, 0]
            positions = columns[None].expand(batch, length)
        elif position_ids is not None:
            positions = position_ids
        else:
            start = 0 if past_key_values is None else past_key_values[0][0].shape[1]
            positions = (start + torch.arange(length))[None].expand(batch, length)
        hidden, q, k, v = self.core.qkv_heads(embeds, positions)
        heads = q.shape[1]

        def flat(t):  # (B, H, l, d) -> (B, l, H*d)
            return t.transpose(1, 2).reshape(batch, t.shape[2], dim)

        def split(t):  # (B, L, H*d) -> (B, H, L, d)
            return t.view(batch, t.shape[1], heads, -1).transpose(1, 2)

        if past_key_values is not None:
            past_k, past_v = past_key_values[0]
            if dual_cache and replace_position is not None:
                past_k[:, columns] = flat(k)  # in place
                past_v[:, columns] = flat(v)
                k, v = split(past_k), split(past_v)
            else:
                k = torch.cat([split(past_k), k], 2)
                v = torch.cat([split(past_v), v], 2)
        logits = self.core.logits(hidden, q, k, v)
        self._record(positions, input_ids, embeds, logits)
        present = [(flat(k), flat(v))] if use_cache else None
        return SimpleNamespace(logits=logits, past_key_values=present)
