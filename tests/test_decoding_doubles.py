"""Test doubles for the decoding tests, written from scratch: tiny models with the public forward
signatures of LLaDA (Fast-dLLM variant, with replace_position), SDAR (block-causal, store_kv)
and Dream (mask 151666, logits shifted by one), a tiny-dLLM factory and a plain sampler that
shares no code with rcd_ext.decoding. Their attention layer is the engine doubles' one
(`tests/engine_doubles/models.py`). The tests at the bottom check the doubles themselves.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import DynamicCache

from rcd_ext.models import TinyDLLMConfig, TinyDLLMModel
from tests.engine_doubles.models import _AttentionCore

LLADA_VOCAB, LLADA_MASK = 126464, 126336
DREAM_VOCAB, DREAM_MASK = 151680, 151666
SDAR_VOCAB, SDAR_MASK = 151680, 151669


def tiny_model(attention: str = "bidirectional", block_length: int | None = None, seed: int = 0,
               vocab_size: int = 16, hidden_size: int = 32) -> TinyDLLMModel:
    """A random tiny dLLM: ids 0 pad, 1 mask, 2 eos, 3 bos, 4 unk, 5.. symbols."""
    torch.manual_seed(seed)
    config = TinyDLLMConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64, mask_token_id=1, pad_token_id=0,
                            eos_token_id=2, attention=attention, block_length=block_length,
                            initializer_range=0.5)
    return TinyDLLMModel(config).eval()


def _embeds(core: _AttentionCore, input_ids, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("exactly one of input_ids and inputs_embeds")
    return core.wte(input_ids) if input_ids is not None else inputs_embeds


class LLaDADouble(nn.Module):
    """LLaDA-like: bidirectional; prefix cache (tuple of (k, v)); dual cache written in place at
    replace_position."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.core = _AttentionCore(LLADA_VOCAB, dim=8, heads=2, max_len=64, seed=seed)
        self.config = SimpleNamespace(model_type="llada", vocab_size=LLADA_VOCAB,
                                      max_sequence_length=64, eos_token_id=None,
                                      pad_token_id=None, mask_token_id=None)

    def get_input_embeddings(self):
        return self.core.wte

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                past_key_values=None, use_cache=False, replace_position=None,
                output_hidden_states=None, return_dict=None):
        embeds = _embeds(self.core, input_ids, inputs_embeds)
        batch, length, _ = embeds.shape
        if replace_position is not None:
            positions = replace_position[0].nonzero()[:, 0][None].expand(batch, -1)
        else:
            start = 0 if past_key_values is None else past_key_values[0][0].shape[2]
            positions = (start + torch.arange(length))[None].expand(batch, -1)
        hidden, q, k, v = self.core.qkv_heads(embeds, positions)
        if replace_position is not None:
            cached_k, cached_v = past_key_values[0]
            cached_k[:, :, positions[0]] = k  # in place, as the dual-cache code does
            cached_v[:, :, positions[0]] = v
            k, v = cached_k, cached_v
        elif past_key_values is not None:
            k = torch.cat([past_key_values[0][0], k], 2)
            v = torch.cat([past_key_values[0][1], v], 2)
        logits = self.core.logits(hidden, q, k, v)
        return SimpleNamespace(logits=logits, past_key_values=((k, v),) if use_cache else None)

    __call__ = nn.Module.__call__


class SDARDouble(nn.Module):
    """SDAR-like: block-causal over blocks of `block`; KV stored only by store_kv=True calls."""

    def __init__(self, block: int = 4, seed: int = 0):
        super().__init__()
        self.core = _AttentionCore(SDAR_VOCAB, dim=8, heads=2, max_len=64, seed=seed)
        self.block = block
        self.config = SimpleNamespace(model_type="sdar", vocab_size=SDAR_VOCAB,
                                      max_position_embeddings=64, eos_token_id=None,
                                      pad_token_id=None, mask_token_id=None)

    def get_input_embeddings(self):
        return self.core.wte

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, store_kv=False,
                **kwargs):
        embeds = _embeds(self.core, input_ids, inputs_embeds)
        batch, length, _ = embeds.shape
        start = 0 if past_key_values is None else past_key_values.get_seq_length()
        positions = (start + torch.arange(length))[None].expand(batch, -1)
        if position_ids is not None:  # SDAR's sampler passes absolute positions
            assert torch.equal(position_ids.expand(batch, -1), positions)
        hidden, q, k, v = self.core.qkv_heads(embeds, positions)
        if store_kv and past_key_values is not None:
            k_all, v_all = past_key_values.update(k, v, 0)  # in place, as SDAR does
        elif start:
            cached_k, cached_v = past_key_values[0]
            k_all, v_all = torch.cat([cached_k, k], 2), torch.cat([cached_v, v], 2)
        else:
            k_all, v_all = k, v
        query_block = torch.arange(start, start + length) // self.block
        key_block = torch.arange(start + length) // self.block
        allowed = key_block[None, :] <= query_block[:, None]
        if attention_mask is not None:  # [1, 1, l, cached + l], 1 = may attend
            assert torch.equal(attention_mask[0, 0].bool(), allowed)
            allowed = attention_mask.bool()
        logits = self.core.logits(hidden, q, k_all, v_all, allowed)
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)

    __call__ = nn.Module.__call__


class DreamDouble(nn.Module):
    """Dream-like: bidirectional, no cache here, logits at i score token i+1."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.core = _AttentionCore(DREAM_VOCAB, dim=8, heads=2, max_len=64, seed=seed)
        self.config = SimpleNamespace(model_type="Dream", vocab_size=DREAM_VOCAB,
                                      max_position_embeddings=64, eos_token_id=None,
                                      pad_token_id=None, mask_token_id=None)

    def get_input_embeddings(self):
        return self.core.wte

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        embeds = _embeds(self.core, input_ids, inputs_embeds)
        batch, length, _ = embeds.shape
        positions = torch.arange(length)[None].expand(batch, -1)
        return SimpleNamespace(logits=self.core.logits(*self.core.qkv_heads(embeds, positions)))

    __call__ = nn.Module.__call__


class StubTokenizer:
    """Just enough tokenizer for mask-id lookup and vocabulary comparison."""

    def __init__(self, vocab: dict[str, int], mask_token_id: int | None = None):
        self.vocab = vocab
        self.mask_token_id = mask_token_id
        self.eos_token_id = self.pad_token_id = self.unk_token_id = None

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def convert_tokens_to_ids(self, token: str):
        return self.vocab.get(token)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)


def plain_semi_ar_sampler(model, prompt: torch.Tensor, gen_length: int, block_length: int,
                          steps: int, mask_id: int, threshold: float | None = None,
                          shift: bool = False) -> torch.Tensor:
    """Greedy LLaDA-style sampler written independently of rcd_ext.decoding: model(x) per step,
    most confident masked tokens of the current block first. Returns x [B, P + gen_length]."""
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    per_block = steps // (gen_length // block_length)
    for block in range(gen_length // block_length):
        lo, hi = plen + block * block_length, plen + (block + 1) * block_length
        start_count = (x[:, lo:hi] == mask_id).sum(1)
        for step in range(per_block):
            masked = x[:, lo:hi] == mask_id
            if not masked.any():
                break
            logits = model(x).logits
            if shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
            block_logits = logits[:, lo:hi].float().clone()
            block_logits[..., mask_id] = float("-inf")  # [MASK] is never committed
            probs = torch.softmax(block_logits, -1)
            confidence, tokens = probs.max(-1)
            for row in range(batch):
                count = int(start_count[row])
                quota = count // per_block + (step < count % per_block)
                scores = torch.where(masked[row], confidence[row], torch.tensor(-1.0))
                order = torch.argsort(scores, descending=True, stable=True)
                chosen = set(order[:quota].tolist())
                if threshold is not None:
                    chosen |= set(((scores > threshold) & masked[row]).nonzero()[:, 0].tolist())
                for column in chosen:
                    if masked[row, column]:
                        x[row, lo + column] = tokens[row, column]
    return x


def plain_cached_sampler(model, prompt: torch.Tensor, gen_length: int, block_length: int,
                         steps: int, mask_id: int, cache: str) -> torch.Tensor:
    """Greedy fixed-schedule sampler for the tiny dLLM with a prefix or dual KV cache, written
    against TinyKVCache directly (independent of rcd_ext.decoding)."""
    from rcd_ext.models import TinyKVCache

    batch, plen = prompt.shape
    total = plen + gen_length
    x = torch.full((batch, total), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    per_block = steps // (gen_length // block_length)
    for block in range(gen_length // block_length):
        lo, hi = plen + block * block_length, plen + (block + 1) * block_length
        start_count = (x[:, lo:hi] == mask_id).sum(1)
        kept = None
        for step in range(per_block):
            if step == 0:
                out = model(input_ids=x, use_cache=True)
                logits, kept = out.logits[:, lo:hi], out.past_key_values
            elif cache == "prefix":
                prefix = TinyKVCache([(k[:, :, :lo], v[:, :, :lo]) for k, v in kept])
                logits = model(input_ids=x[:, lo:], past_key_values=prefix).logits[:, :hi - lo]
            else:
                others = TinyKVCache([(torch.cat([k[:, :, :lo], k[:, :, hi:]], 2),
                                       torch.cat([v[:, :, :lo], v[:, :, hi:]], 2))
                                      for k, v in kept])
                logits = model(input_ids=x[:, lo:hi], past_key_values=others,
                               position_ids=torch.arange(lo, hi)[None].expand(batch, -1)).logits
            logits = logits.float().clone()
            logits[..., mask_id] = float("-inf")  # [MASK] is never committed
            confidence, tokens = torch.softmax(logits, -1).max(-1)
            for row in range(batch):
                masked = x[row, lo:hi] == mask_id
                count = int(start_count[row])
                quota = count // per_block + (step < count % per_block)
                scores = torch.where(masked, confidence[row], torch.tensor(-1.0))
                for column in torch.argsort(scores, descending=True, stable=True)[:quota]:
                    x[row, lo + column] = tokens[row, column]
    return x


# ---- the doubles behave like the models they stand for -------------------------------------

def test_llada_double_caches_match_full_forward():
    model = LLaDADouble()
    x = torch.randint(0, 100, (2, 12))
    full = model(x, use_cache=True)
    prefix = tuple((k[:, :, :8], v[:, :, :8]) for k, v in full.past_key_values)
    # prefix cache: the last rows differ from a full forward only through the prefix's view
    step = model(x[:, 8:], past_key_values=prefix, use_cache=True)
    assert step.logits.shape == (2, 4, LLADA_VOCAB)
    replace = torch.zeros(1, 12, dtype=torch.bool)
    replace[:, 4:8] = True
    dual = model(x[:, 4:8], past_key_values=full.past_key_values, use_cache=True,
                 replace_position=replace)
    torch.testing.assert_close(dual.logits, full.logits[:, 4:8])


def test_sdar_double_is_block_causal():
    model = SDARDouble(block=4)
    x = torch.randint(0, 100, (1, 8))
    full = model(x).logits
    changed = x.clone()
    changed[:, 6] = 7
    torch.testing.assert_close(model(changed).logits[:, :4], full[:, :4])
    cache = DynamicCache()
    model(x[:, :4], past_key_values=cache, use_cache=True, store_kv=True)
    assert cache.get_seq_length() == 4
    torch.testing.assert_close(model(x[:, 4:], past_key_values=cache).logits, full[:, 4:])
    assert cache.get_seq_length() == 4  # store_kv=False leaves the cache alone


def test_plain_sampler_fills_every_position():
    model = tiny_model()
    x = plain_semi_ar_sampler(model, torch.tensor([[5, 6, 7]]), 8, 4, 4, mask_id=1)
    assert not (x == 1).any()
