"""Prompts of different lengths in one `generate` call (left padding).

The key property: with the tiny dLLM, greedy, in every loop and cache mode, with and without
residuals and for both remasking policies, a batch of prompts of different lengths decodes
every row exactly as that prompt alone. It needs the padding mask on every forward (pads
attended would change every row) and per-row positions (a row shifted by its padding would see
other position embeddings). Around it: padding never reaches the outputs, is never masked,
committed or given a residual; models without padding support refuse with a clear error;
batches of one prompt length decode exactly as before padding existed.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_decoding_doubles import (
    SDAR_MASK,
    DreamDouble,
    LLaDADouble,
    SDARDouble,
    StubTokenizer,
    tiny_model,
)

from rcd_ext.decoding.generation import batch_layout, generate
from rcd_ext.models import TinyDLLMConfig, TinyDLLMModel, build_tiny_tokenizer

MASK, EOS, PAD = 1, 2, 0
COMMON = dict(gen_length=8, block_length=4, steps=4)
SEMI_AR = {"none": dict(cache="none"), "prefix": dict(cache="prefix"), "dual": dict(cache="dual")}
# (lengths, loop): 3/5/7 pad the semi-AR rows by 4/2/0 columns and the block-causal rows by
# one whole block; 2/6/9 make block-causal rows start generating in different blocks
LENGTHS = [(3, 5, 7), (2, 6, 9)]


def mixed_prompts(lengths: tuple[int, ...], seed: int = 5) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 16, (n,), generator=generator).tolist() for n in lengths]


def model_for(mode: str):
    return tiny_model("block_causal", 4) if mode == "block" else tiny_model()


def decoding(mode: str, rcd: bool, init: str, remasking: str) -> dict:
    return dict(COMMON, **SEMI_AR.get(mode, {}), rcd=rcd, init=init, remasking=remasking,
                threshold=0.5, ref_model=tiny_model(seed=2) if init == "reference" else None)


RESIDUALS = [(False, "cold"), (True, "cold"), (True, "self"), (True, "reference")]


# ---- the key equivalence --------------------------------------------------------------------
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("remasking", ["fixed", "threshold"])
@pytest.mark.parametrize("rcd, init", RESIDUALS)
@pytest.mark.parametrize("mode", ["none", "prefix", "dual", "block"])
def test_a_mixed_batch_decodes_each_row_as_alone(mode, rcd, init, remasking, lengths):
    model = model_for(mode)
    rows = mixed_prompts(lengths)
    kwargs = decoding(mode, rcd, init, remasking)
    together = generate(model, rows, **kwargs)
    assert together.tokens.shape == (len(rows), COMMON["gen_length"])
    for index, row in enumerate(rows):
        alone = generate(model, [row], **kwargs)
        assert torch.equal(together.tokens[index], alone.tokens[0]), (index, len(row))
        width = alone.sequences.shape[1]  # the row's own prompt and tokens, right-aligned
        assert torch.equal(together.sequences[index, -width:], alone.sequences[0])


def test_the_batch_is_really_padded():
    """The layouts the equivalence runs on: semi-AR rows padded to the longest; block-causal
    rows padded by whole blocks, starting to generate in different blocks for 2/6/9."""
    semi = batch_layout([3, 5, 7], 8, 4, block_diffusion=False)
    assert (semi.offsets, semi.gen_starts, semi.total) == ([4, 2, 0], [7, 7, 7], 15)
    block = batch_layout([3, 5, 7], 8, 4, block_diffusion=True)
    assert (block.offsets, block.gen_starts, block.total) == ([4, 0, 0], [7, 5, 7], 16)
    split = batch_layout([2, 6, 9], 8, 4, block_diffusion=True)
    assert (split.offsets, split.gen_starts, split.total) == ([4, 0, 0], [6, 6, 9], 20)


# ---- what every forward receives ------------------------------------------------------------
class ForwardSpy:
    """Records the kwargs of every forward of a tiny model (a pre-hook sees them all)."""

    def __init__(self, model: TinyDLLMModel):
        self.calls: list[dict] = []
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append(dict(kwargs))


@pytest.mark.parametrize("rcd, init", RESIDUALS)
@pytest.mark.parametrize("mode", ["none", "prefix", "dual", "block"])
def test_padding_is_masked_in_every_forward_and_never_gets_a_residual(mode, rcd, init):
    model = model_for(mode)
    spy = ForwardSpy(model)
    rows = mixed_prompts((3, 5, 7))
    pad_embedding = model.get_input_embeddings().weight[PAD]
    generate(model, rows, **decoding(mode, rcd, init, "fixed"))
    assert spy.calls
    for call in spy.calls:
        mask = call["attention_mask"]  # the model checks its shape: [B, cached + new]
        assert call["position_ids"] is not None
        new = mask[:, -call["position_ids"].shape[1]:] == 0  # padded query slots
        if call.get("input_ids") is not None:
            assert (call["input_ids"][new] == PAD).all()
        else:  # residuals go to masked positions only: a pad keeps its plain embedding
            assert torch.equal(call["inputs_embeds"][new],
                               pad_embedding.expand(int(new.sum()), -1))
        # a row's real tokens start at position 0 whatever its padding
        positions = call["position_ids"].expand(mask.shape[0], -1)
        assert (positions[new] == 0).all() and positions.min() >= 0


@pytest.mark.parametrize("mode", ["none", "dual", "block"])
def test_sequences_are_left_padded_and_text_has_no_padding(mode):
    symbols = [chr(ord("a") + i) for i in range(11)]
    tokenizer = build_tiny_tokenizer(symbols)
    assert tokenizer.pad_token_id == PAD
    model = model_for(mode)
    texts = ["a b c", "d e f g h", "a"]
    result = generate(model, texts, tokenizer=tokenizer, **COMMON, **SEMI_AR.get(mode, {}))
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    assert result.prompt_lengths == [len(p) for p in prompts]
    assert result.prompt_length == max(result.prompt_lengths)
    assert result.sequences.shape == (3, result.prompt_length + COMMON["gen_length"])
    for index, prompt in enumerate(prompts):
        padding = [PAD] * (result.prompt_length - len(prompt))
        row = result.sequences[index].tolist()
        assert row == padding + prompt + result.tokens[index].tolist()
        sequence = row[len(padding):]
        alone = generate(model, [texts[index]], tokenizer=tokenizer, **COMMON,
                         **SEMI_AR.get(mode, {}))
        assert result.text[index] == alone.text[0]
        assert alone.sequences[0].tolist() == sequence


def test_pad_id_falls_back_to_eos_and_can_be_given():
    config = TinyDLLMConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64, mask_token_id=MASK,
                            initializer_range=0.5)
    torch.manual_seed(0)
    model = TinyDLLMModel(config).eval()  # neither a pad nor an EOS id
    rows = mixed_prompts((3, 5))
    with pytest.raises(ValueError, match="pass pad_id="):
        generate(model, rows, **COMMON)
    with pytest.raises(ValueError, match="other than the mask id"):
        generate(model, rows, pad_id=MASK, **COMMON)
    given = generate(model, rows, pad_id=7, **COMMON)
    for index, row in enumerate(rows):
        assert torch.equal(given.tokens[index], generate(model, [row], **COMMON).tokens[0])
    model.config.eos_token_id = EOS
    assert torch.equal(generate(model, rows, stop_at_eos=False, **COMMON).tokens,
                       generate(model, rows, pad_id=7, stop_at_eos=False, **COMMON).tokens)


# ---- models without padding support ---------------------------------------------------------
@pytest.mark.parametrize("factory, kwargs, name", [
    (LLaDADouble, dict(cache="none"), "llada"),
    (lambda: SDARDouble(block=4), dict(tokenizer=StubTokenizer({"<|MASK|>": SDAR_MASK})),
     "sdar"),
])
def test_models_without_padding_support_refuse_clearly(factory, kwargs, name):
    model = factory()
    with pytest.raises(ValueError, match=f"{name} does not support prompts of different "
                                         "lengths in one batch: decode them separately"):
        generate(model, mixed_prompts((3, 7)), **COMMON, **kwargs)
    generate(model, mixed_prompts((3, 3)), **COMMON, **kwargs)  # equal lengths still work


def test_unknown_models_refuse_padding_too():
    model = DreamDouble()
    model.config = SimpleNamespace(model_type="mystery", vocab_size=model.config.vocab_size)
    with pytest.raises(ValueError, match="mystery does not support prompts of different"):
        generate(model, mixed_prompts((3, 7)), mask_id=4, **COMMON)


def test_block_diffusion_prompts_within_a_block_of_each_other_need_no_padding():
    """SDAR takes no padding, but prompts of 5, 8 and 6 tokens (block 4) are less than a block
    apart: nothing is padded, rows start generating at different columns (in block 1 or 2)."""
    assert not batch_layout([5, 8, 6], 8, 4, block_diffusion=True).padded
    model = SDARDouble(block=4)
    tokenizer = StubTokenizer({"<|MASK|>": SDAR_MASK})
    rows = mixed_prompts((5, 8, 6))
    for rcd in (False, True):
        together = generate(model, rows, tokenizer=tokenizer, rcd=rcd, **COMMON)
        for index, row in enumerate(rows):
            alone = generate(model, [row], tokenizer=tokenizer, rcd=rcd, **COMMON)
            assert torch.equal(together.tokens[index], alone.tokens[0])


# ---- equal lengths: unchanged ---------------------------------------------------------------
# generate(prompts, gen_length=8, block_length=4, steps=4, temperature=0.8, seed=3,
# threshold=0.5, stop_at_eos=False, init "self" with rcd) recorded before left padding existed
EQUAL_PROMPTS = [[11, 8, 7, 9, 5], [13, 5, 7, 15, 8], [13, 8, 13, 15, 10]]
RECORDED = {
    "none-False-fixed": [[7, 3, 3, 3, 3, 3, 4, 7], [5, 3, 14, 11, 3, 5, 14, 7],
                         [5, 3, 11, 12, 5, 3, 5, 11]],
    "none-True-threshold": [[3, 3, 3, 3, 5, 3, 5, 14], [5, 13, 14, 3, 5, 12, 4, 5],
                            [5, 13, 14, 12, 5, 5, 4, 8]],
    "prefix-False-threshold": [[14, 3, 3, 3, 7, 3, 4, 3], [5, 3, 14, 11, 3, 5, 14, 7],
                               [5, 3, 11, 12, 5, 3, 5, 11]],
    "prefix-True-fixed": [[7, 3, 3, 6, 3, 12, 14, 7], [13, 13, 14, 3, 5, 5, 14, 6],
                          [5, 13, 14, 12, 5, 5, 4, 11]],
    "dual-False-fixed": [[7, 3, 3, 3, 3, 3, 4, 7], [5, 3, 14, 11, 3, 5, 14, 7],
                         [5, 3, 11, 12, 5, 3, 5, 11]],
    "dual-True-threshold": [[3, 3, 3, 3, 5, 3, 4, 14], [13, 13, 14, 3, 5, 5, 14, 6],
                            [5, 3, 14, 12, 6, 12, 4, 15]],
    "block-False-fixed": [[3, 3, 14, 3, 11, 3, 4, 7], [5, 3, 7, 11, 3, 3, 4, 5],
                          [5, 3, 7, 3, 8, 12, 7, 3]],
    "block-True-threshold": [[3, 3, 6, 5, 3, 14, 4, 14], [2, 13, 3, 11, 3, 12, 14, 4],
                             [13, 13, 9, 12, 8, 12, 14, 5]],
}


@pytest.mark.parametrize("key", list(RECORDED))
def test_equal_length_batches_decode_as_before(key):
    mode, rcd, remasking = key.split("-")
    rcd = rcd == "True"
    model = model_for(mode)
    spy = ForwardSpy(model)
    torch.set_num_threads(1)
    result = generate(model, torch.tensor(EQUAL_PROMPTS), **COMMON, **SEMI_AR.get(mode, {}),
                      rcd=rcd, remasking=remasking, threshold=0.5, temperature=0.8, seed=3,
                      init="self" if rcd else "cold", stop_at_eos=False)
    assert result.tokens.tolist() == RECORDED[key]
    assert isinstance(result.sequences, torch.Tensor) and result.sequences.shape == (3, 13)
    # nothing padded: no mask, and position ids only where the dual cache's steps always
    # passed them (the block alone, after a cache)
    assert all(call.get("attention_mask") is None for call in spy.calls)
    for call in spy.calls:
        if call.get("position_ids") is not None:
            assert mode == "dual" and call.get("past_key_values") is not None


# ---- lm-eval ----------------------------------------------------------------------------------
def _lm_eval_model(tmp_path_factory, attention: str):
    pytest.importorskip("lm_eval")
    from test_lm_eval_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp(attention), attention=attention)


@pytest.mark.parametrize("attention, cache", [("bidirectional", "none"),
                                              ("bidirectional", "dual"),
                                              ("block_causal", "none")])
def test_lm_eval_batches_mixed_lengths_like_batch_size_one(tmp_path_factory, monkeypatch,
                                                          attention, cache):
    path = _lm_eval_model(tmp_path_factory, attention)
    from lm_eval.api.instance import Instance

    import rcd_ext.decoding
    from rcd_ext.integrations.lm_eval_model import RCDLM

    options = dict(pretrained=path, device="cpu", gen_length=8, block_length=4, steps=4,
                   cache=cache)
    contexts = ["3 4 5", "1 2", "0 7 6 5 4 3 2", "2 2 2 2 2", "6"]
    requests = [Instance("generate_until", {}, (context, {"until": []}), index)
                for index, context in enumerate(contexts)]
    calls = []
    original = rcd_ext.decoding.generate

    def counting(model, prompt, **kwargs):
        calls.append([len(row) for row in prompt])
        return original(model, prompt, **kwargs)

    monkeypatch.setattr(rcd_ext.decoding, "generate", counting)
    batched = RCDLM(batch_size=8, **options)
    assert batched.pads_prompts
    together = batched.generate_until(requests, disable_tqdm=True)
    assert len(calls) == 1 and len(set(calls[0])) == 5  # one batch, every length in it
    assert calls[0] == sorted(calls[0], reverse=True)  # longest first
    alone = RCDLM(batch_size=1, **options).generate_until(requests, disable_tqdm=True)
    assert together == alone

    # without padding support: batches of equal prompt length only, same strings
    calls.clear()
    grouped = RCDLM(batch_size=8, **options)
    grouped.adapter.supports_padding = False
    assert not grouped.pads_prompts
    assert grouped.generate_until(requests, disable_tqdm=True) == alone
    assert all(len(set(batch)) == 1 for batch in calls) and len(calls) == 5
