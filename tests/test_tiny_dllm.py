"""Tests of the built-in tiny dLLM (rcd_ext.models.tiny_dllm) and its tokenizer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer  # noqa: E402

from rcd_ext.models import (  # noqa: E402
    SPECIAL_TOKENS,
    TinyDLLMConfig,
    TinyDLLMModel,
    TinyKVCache,
    build_tiny_tokenizer,
    tiny_vocab,
)

torch.set_num_threads(1)
VOCAB = 13
MASK_ID = 1


def make_model(seed: int = 0, **overrides) -> TinyDLLMModel:
    settings = dict(vocab_size=VOCAB, mask_token_id=MASK_ID, max_position_embeddings=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = TinyDLLMModel(TinyDLLMConfig(**settings)).eval()
    # The default init (std 0.02) makes every position's output nearly the same; larger weights
    # make the equalities below sensitive to any wrong mask or position.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def same_weights(model: TinyDLLMModel, **overrides) -> TinyDLLMModel:
    """A model with the same parameters under a different attention rule."""
    config = TinyDLLMConfig(**{**model.config.to_dict(), **overrides})
    other = TinyDLLMModel(config).eval()
    other.load_state_dict(model.state_dict())
    return other


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mask_token_id=None), "mask_token_id is required"),
        (dict(mask_token_id=VOCAB), "outside the vocabulary"),
        (dict(pad_token_id=-1), "outside the vocabulary"),
        (dict(attention="causal"), "attention='causal'"),
        (dict(attention="block_causal"), "block_length is required"),
        (dict(attention="block_causal", block_length=0), "block_length=0"),
        (dict(hidden_size=30), "not divisible"),
        (dict(vocab_size=None), "vocab_size is required"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_rejects_bad_fields(overrides: dict, message: str) -> None:
    settings = {"vocab_size": VOCAB, "mask_token_id": MASK_ID, **overrides}
    with pytest.raises(ValueError, match=message):
        TinyDLLMConfig(**settings)


def test_init_is_deterministic_under_manual_seed() -> None:
    config = TinyDLLMConfig(vocab_size=VOCAB, mask_token_id=MASK_ID)
    torch.manual_seed(3)
    first = TinyDLLMModel(config).state_dict()
    torch.manual_seed(3)
    second = TinyDLLMModel(config).state_dict()
    torch.manual_seed(4)
    third = TinyDLLMModel(config).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["embed_tokens.weight"], third["embed_tokens.weight"])
    # Embedding tables at unit scale (regression: at std 0.02 they were swamped in the residual
    # stream and the model could not learn to chase a pointer); the other weights stay small.
    for name in ("embed_tokens.weight", "embed_positions.weight"):
        assert 0.8 < float(first[name].std()) < 1.2, name
    assert first["lm_head.weight"].std() < 0.05
    assert first["lm_head.weight"].data_ptr() != first["embed_tokens.weight"].data_ptr()


def test_tied_head_option() -> None:
    config = TinyDLLMConfig(vocab_size=VOCAB, mask_token_id=MASK_ID, tie_word_embeddings=True)
    model = TinyDLLMModel(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight


# --- forward contract -----------------------------------------------------------------------
def test_output_shapes_dtype_and_tuple_form() -> None:
    model = make_model()
    ids = random_ids(3, 7)
    out = model(input_ids=ids)
    assert out.logits.shape == (3, 7, VOCAB)
    assert out.logits.dtype == torch.float32
    assert out.past_key_values is None
    as_tuple = model(input_ids=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], out.logits, rtol=0, atol=0)
    logits_bf16 = model.to(torch.bfloat16)(input_ids=ids).logits
    assert logits_bf16.dtype == torch.float32


def test_exactly_one_of_ids_and_embeds() -> None:
    model = make_model()
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_inputs_embeds_path_equals_ids_path(attention: str) -> None:
    model = make_model(attention=attention, block_length=4)
    ids = random_ids(3, 10)
    embeds = model.get_input_embeddings()(ids)
    from_ids = model(input_ids=ids, use_cache=True)
    from_embeds = model(inputs_embeds=embeds, use_cache=True)
    assert torch.equal(from_ids.logits, from_embeds.logits)
    caches = zip(from_ids.past_key_values, from_embeds.past_key_values, strict=True)
    for (k1, v1), (k2, v2) in caches:
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_inputs_embeds_are_not_ignored() -> None:
    model = make_model()
    ids = random_ids(2, 6)
    embeds = model.get_input_embeddings()(ids)
    mixed = embeds.clone()
    mixed[:, 2] = 0.5 * embeds[:, 2] + 0.5 * model.get_input_embeddings().weight[MASK_ID]
    assert not torch.allclose(model(inputs_embeds=mixed).logits, model(inputs_embeds=embeds).logits)


def test_set_input_embeddings_is_used() -> None:
    model = make_model()
    ids = random_ids(2, 6)
    before = model(input_ids=ids).logits
    replacement = torch.nn.Embedding(VOCAB, model.config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement
    assert not torch.allclose(model(input_ids=ids).logits, before)


# --- attention rules and cache --------------------------------------------------------------
def test_block_causal_mask_follows_block_rule() -> None:
    block = 4
    model = make_model(attention="block_causal", block_length=block)
    ids = random_ids(1, 12)
    base = model(input_ids=ids).logits
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % VOCAB  # a token of block 2
    logits = model(input_ids=changed).logits
    # Blocks 0 and 1 cannot see block 2; every position of block 2 can.
    torch.testing.assert_close(logits[:, : 2 * block], base[:, : 2 * block], rtol=0, atol=0)
    assert (logits[0, 2 * block :] - base[0, 2 * block :]).abs().amax(dim=-1).min() > 1e-4
    changed = ids.clone()
    changed[0, 1] = (changed[0, 1] + 1) % VOCAB  # a token of block 0 is seen by all
    assert (model(input_ids=changed).logits - base)[0].abs().amax(dim=-1).min() > 1e-4


def test_bidirectional_sees_later_positions() -> None:
    model = make_model()
    ids = random_ids(1, 8)
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % VOCAB
    difference = (model(input_ids=changed).logits - model(input_ids=ids).logits)[0, :7]
    assert difference.abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("prefix_length, new_length", [(8, 4), (4, 4), (8, 3)])
def test_block_causal_cache_is_exact(prefix_length: int, new_length: int) -> None:
    model = make_model(attention="block_causal", block_length=4)
    ids = random_ids(2, prefix_length + new_length)
    full = model(input_ids=ids, use_cache=True)
    first = model(input_ids=ids[:, :prefix_length], use_cache=True)
    second = model(input_ids=ids[:, prefix_length:], past_key_values=first.past_key_values)
    torch.testing.assert_close(first.logits, full.logits[:, :prefix_length], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.logits, full.logits[:, prefix_length:], rtol=1e-5, atol=1e-5)


def test_bidirectional_prefix_cache_means_prefix_attends_only_to_itself() -> None:
    prefix_length, new_length = 6, 5
    model = make_model()
    ids = random_ids(2, prefix_length + new_length)
    cache = model(input_ids=ids[:, :prefix_length], use_cache=True).past_key_values
    cached = model(input_ids=ids[:, prefix_length:], past_key_values=cache).logits
    # The same weights under block_causal with one block = the prefix: the prefix sees only
    # itself and the new tokens see everything, which is what the cached call computes.
    reference = same_weights(model, attention="block_causal", block_length=prefix_length)
    expected = reference(input_ids=ids).logits[:, prefix_length:]
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    # ...and it is an approximation: in a full bidirectional forward the prefix sees the suffix.
    exact = model(input_ids=ids).logits[:, prefix_length:]
    assert (cached - exact).abs().max() > 1e-4


def test_cache_is_new_and_input_cache_untouched() -> None:
    model = make_model(attention="block_causal", block_length=4)
    ids = random_ids(2, 12)
    first = model(input_ids=ids[:, :8], use_cache=True).past_key_values
    snapshot = [(k.clone(), v.clone()) for k, v in first]
    second = model(input_ids=ids[:, 8:], past_key_values=first, use_cache=True).past_key_values
    assert isinstance(second, TinyKVCache) and second is not first
    assert first.get_seq_length() == 8 and second.get_seq_length() == 12
    assert len(second) == model.config.num_hidden_layers
    for (k, v), (k0, v0) in zip(first, snapshot, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    full = model(input_ids=ids, use_cache=True).past_key_values
    for (k, v), (kf, vf) in zip(second, full, strict=True):
        assert k.shape == (2, model.config.num_attention_heads, 12, 16)
        torch.testing.assert_close(k, kf, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, vf, rtol=1e-5, atol=1e-5)
    cropped = second.crop(4)
    assert cropped.get_seq_length() == 4 and torch.equal(cropped[0][0], full[0][0][:, :, :4])


def test_cached_call_uses_absolute_positions() -> None:
    model = make_model()
    ids = random_ids(1, 10)
    cache = model(input_ids=ids[:, :6], use_cache=True).past_key_values
    default = model(input_ids=ids[:, 6:], past_key_values=cache).logits
    explicit = model(
        input_ids=ids[:, 6:], past_key_values=cache, position_ids=torch.arange(6, 10)
    ).logits
    wrong = model(input_ids=ids[:, 6:], past_key_values=cache, position_ids=torch.arange(4)).logits
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, wrong)


def test_empty_cache_equals_none() -> None:
    model = make_model()
    ids = random_ids(2, 5)
    assert torch.equal(
        model(input_ids=ids, past_key_values=TinyKVCache()).logits, model(input_ids=ids).logits
    )


# --- padding --------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_left_padding_is_invisible(attention: str) -> None:
    pad = 3
    model = make_model(attention=attention, block_length=4)
    real = random_ids(1, 7)
    padded = torch.cat([torch.zeros(2, pad, dtype=torch.long), real.repeat(2, 1)], dim=1)
    padded[1, :pad] = torch.tensor([5, 9, 2])  # the pad content must not matter either
    mask = torch.ones_like(padded)
    mask[:, :pad] = 0
    logits = model(input_ids=padded, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0, pad:], logits[1, pad:], rtol=0, atol=1e-6)
    if attention == "bidirectional":
        # Same slots and positions, padding simply absent from the keys.
        alone = model(input_ids=real, position_ids=torch.arange(pad, pad + 7)).logits
        torch.testing.assert_close(logits[0, pad:], alone[0], rtol=1e-5, atol=1e-5)


def test_fully_padded_rows_and_padded_cache_stay_finite() -> None:
    model = make_model(attention="block_causal", block_length=4)
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1] = 0  # an all-padding row
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert torch.isfinite(out.logits).all()
    new = random_ids(2, 4, seed=5)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
    second = model(input_ids=new, past_key_values=out.past_key_values, attention_mask=full_mask)
    assert torch.isfinite(second.logits).all()
    # Row 1's cached slots are padding, so its new tokens behave like a fresh sequence.
    fresh = model(input_ids=new[1:], position_ids=torch.arange(8, 12)).logits
    reference = same_weights(model, attention="bidirectional")
    fresh_reference = reference(input_ids=new[1:], position_ids=torch.arange(8, 12)).logits
    torch.testing.assert_close(second.logits[1:], fresh_reference, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(fresh).all()


def test_no_query_row_of_the_mask_is_empty() -> None:
    # Older torch versions (and some kernels) turn a softmax over no keys into NaN, so the mask
    # itself must give every query at least one key, padded or not.
    model = make_model(attention="block_causal", block_length=4)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0] = 0
    mask[1, :8] = 0
    allowed = model._attention_allowed(8, 4, mask, torch.device("cpu"))
    assert allowed.shape == (3, 1, 4, 12)
    assert allowed.any(dim=-1).all()
    # Real rows keep the block rule and never see padding.
    assert not allowed[1, 0, :, :8].any() and allowed[2, 0].all()


def test_gradients_through_padded_batch_are_finite() -> None:
    model = make_model(attention="block_causal", block_length=4).train()
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1] = 0
    model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_shapes_raise() -> None:
    model = make_model()
    ids = random_ids(2, 5)
    cache = model(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, past_key_values=cache, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="batch"):
        model(input_ids=ids[:1], past_key_values=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=random_ids(1, 40))


# --- Hugging Face integration ---------------------------------------------------------------
def test_auto_classes_and_save_load_round_trip(tmp_path) -> None:
    model = make_model(attention="block_causal", block_length=4, pad_token_id=0)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, TinyDLLMConfig)
    assert (config.mask_token_id, config.attention, config.block_length) == (
        MASK_ID,
        "block_causal",
        4,
    )
    ids = random_ids(2, 9)
    expected = model(input_ids=ids).logits
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, TinyDLLMModel)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_auto_from_config() -> None:
    config = TinyDLLMConfig(vocab_size=VOCAB, mask_token_id=MASK_ID)
    assert isinstance(AutoModel.from_config(config), TinyDLLMModel)
    built = AutoConfig.for_model("rcd-tiny-dllm", vocab_size=VOCAB, mask_token_id=2)
    assert isinstance(built, TinyDLLMConfig) and built.mask_token_id == 2


# --- tokenizer ------------------------------------------------------------------------------
def test_tokenizer_layout_and_round_trip(tmp_path) -> None:
    symbols = ["a", "b", "c->d", "7"]
    tokenizer = build_tiny_tokenizer(symbols)
    vocab = tiny_vocab(symbols)
    assert tokenizer.get_vocab() == vocab
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(symbols)
    assert tokenizer.mask_token_id == vocab["[MASK]"] == 1
    assert tokenizer.pad_token_id == vocab["[PAD]"]
    text = "c->d a [MASK] 7 b"
    ids = tokenizer(text)["input_ids"]
    assert ids == [vocab[token] for token in text.split()]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "c->d a 7 b"
    assert tokenizer("a zz")["input_ids"] == [vocab["a"], vocab["[UNK]"]]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == vocab
    assert loaded.mask_token_id == tokenizer.mask_token_id
    assert loaded(text)["input_ids"] == ids and loaded.decode(ids) == text


@pytest.mark.parametrize("symbols", [["a", "a"], ["a b"], [""], ["[MASK]"]])
def test_tokenizer_rejects_bad_symbols(symbols: list[str]) -> None:
    with pytest.raises(ValueError, match="symbol"):
        build_tiny_tokenizer(symbols)
