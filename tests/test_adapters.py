"""Model-family adapters: mask ids, logit shift, cache modes, cache lengths, reference checks,
loading."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_decoding_doubles import (
    DREAM_MASK,
    LLADA_MASK,
    SDAR_MASK,
    DreamDouble,
    LLaDADouble,
    SDARDouble,
    StubTokenizer,
    tiny_model,
)
from transformers import DynamicCache

from rcd_ext.models import TinyKVCache, build_tiny_tokenizer
from rcd_ext.models.adapters import ModelAdapter, check_reference, get_adapter, load_model


def test_family_defaults():
    tiny = get_adapter(tiny_model())
    assert (tiny.family, tiny.mask_id, tiny.eos_id, tiny.loop) == ("tiny", 1, 2, "semi_ar")
    assert tiny.cache_modes == ("none", "prefix", "dual")
    block = get_adapter(tiny_model("block_causal", 4))
    assert block.loop == "block_diffusion"

    llada = get_adapter(LLaDADouble())
    assert (llada.family, llada.mask_id, llada.shift_logits) == ("llada", LLADA_MASK, False)
    assert "dual" in llada.cache_modes

    dream = get_adapter(DreamDouble())
    assert (dream.family, dream.mask_id, dream.shift_logits) == ("dream", DREAM_MASK, True)

    sdar = get_adapter(SDARDouble(), StubTokenizer({"<|MASK|>": SDAR_MASK}))
    assert (sdar.family, sdar.mask_id, sdar.loop) == ("sdar", SDAR_MASK, "block_diffusion")


def test_llada_without_replace_position_has_no_dual_cache():
    class OldLLaDA(LLaDADouble):
        def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None,
                    past_key_values=None, use_cache=False):
            return super().forward(input_ids, inputs_embeds, past_key_values=past_key_values,
                                   use_cache=use_cache)

    assert get_adapter(OldLLaDA()).cache_modes == ("none", "prefix")


def test_mask_id_sources_and_override():
    sdar = SDARDouble()
    with pytest.raises(ValueError, match="no mask token id"):
        get_adapter(sdar)  # SDAR's mask id comes from its tokenizer
    assert get_adapter(sdar, mask_id=7).mask_id == 7
    generic = DreamDouble()
    generic.config = SimpleNamespace(model_type="bert", vocab_size=generic.config.vocab_size)
    adapter = get_adapter(generic, StubTokenizer({}, mask_token_id=42))
    assert (adapter.family, adapter.mask_id, adapter.shift_logits) == ("generic", 42, False)
    assert get_adapter(generic, mask_id=5, shift_logits=True).shift_logits
    with pytest.raises(ValueError, match="outside the input embedding table"):
        get_adapter(tiny_model(), mask_id=99)


def test_models_without_embedding_input_are_refused():
    class NoTable(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match="get_input_embeddings"):
        get_adapter(NoTable())


def test_dream_logits_are_shifted_by_one():
    adapter = get_adapter(DreamDouble())
    raw = torch.randn(1, 4, 3)
    aligned = adapter.logits(SimpleNamespace(logits=raw))
    assert torch.equal(aligned[0, 1:], raw[0, :3]) and torch.equal(aligned[0, 0], raw[0, 0])


def test_cache_lengths_of_every_layout():
    k = torch.zeros(2, 3, 5, 4)
    assert ModelAdapter.cache_length(None) == 0
    assert ModelAdapter.cache_length(((k, k),)) == 5  # LLaDA: (B, H, L, d)
    assert ModelAdapter.cache_length(((torch.zeros(2, 7, 12), k),)) == 7  # Dream: (B, L, H*d)
    assert ModelAdapter.cache_length(TinyKVCache([(k, k)])) == 5
    dynamic = DynamicCache()
    dynamic.update(k, k, 0)
    assert ModelAdapter.cache_length(dynamic) == 5


def test_crop_cache_keeps_the_prefix():
    adapter = get_adapter(tiny_model())
    k = torch.randn(1, 2, 6, 4)
    assert adapter.crop_cache(((k, k),), 2)[0][0].shape[2] == 2
    assert adapter.crop_cache(TinyKVCache([(k, k)]), 3).get_seq_length() == 3


def test_reference_checks_name_the_mismatch():
    target = get_adapter(tiny_model())
    check_reference(target, get_adapter(tiny_model(seed=1)))
    with pytest.raises(ValueError, match="reference vocab 20 != target vocab 16"):
        check_reference(target, get_adapter(tiny_model(vocab_size=20)))
    with pytest.raises(ValueError, match="reference mask id 3 != target mask id 1"):
        check_reference(target, get_adapter(tiny_model(), mask_id=3))
    tokenizer = build_tiny_tokenizer([chr(ord("a") + i) for i in range(11)])
    other = build_tiny_tokenizer([chr(ord("b") + i) for i in range(11)])
    check_reference(target, target, tokenizer, tokenizer)
    with pytest.raises(ValueError, match="reference tokenizer differs"):
        check_reference(target, target, tokenizer, other)


def test_load_model_round_trip_and_no_remote_code_by_default(tmp_path, monkeypatch):
    model = tiny_model()
    tokenizer = build_tiny_tokenizer([chr(ord("a") + i) for i in range(11)])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    import transformers

    seen = []
    original = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert seen and set(seen) == {False} and not loaded.training
    assert loaded_tokenizer.mask_token_id == 1
    x = torch.tensor([[5, 6, 1, 1]])
    assert torch.equal(loaded(x).logits, model(x).logits)
    seen.clear()
    load_model(str(tmp_path), trust_remote_code=True)
    assert seen and set(seen) == {True}
