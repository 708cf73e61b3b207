"""rcd_ext.generate: SeqD == plain decoding, alpha 0 == SeqD in every loop and cache mode,
batches == single runs, stats, EOS, seeds, traces, and clear errors for bad input."""

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
    plain_cached_sampler,
    plain_semi_ar_sampler,
    tiny_model,
)

from rcd_ext.decoding.generation import generate
from rcd_ext.models import build_tiny_tokenizer

MASK, EOS = 1, 2
SDAR_TOKENIZER = StubTokenizer({"<|MASK|>": SDAR_MASK})


def setups():
    """(name, model factory, generate kwargs, prompt token range) for every loop and cache."""
    tiny_kwargs = dict(gen_length=8, block_length=4, steps=4)
    return [
        ("tiny-none", lambda: tiny_model(), dict(tiny_kwargs, cache="none")),
        ("tiny-prefix", lambda: tiny_model(), dict(tiny_kwargs, cache="prefix")),
        ("tiny-dual", lambda: tiny_model(), dict(tiny_kwargs, cache="dual")),
        ("tiny-block-diffusion", lambda: tiny_model("block_causal", 4), dict(tiny_kwargs)),
        ("llada-none", lambda: LLaDADouble(), dict(tiny_kwargs, cache="none")),
        ("llada-prefix", lambda: LLaDADouble(), dict(tiny_kwargs, cache="prefix")),
        ("llada-dual", lambda: LLaDADouble(), dict(tiny_kwargs, cache="dual")),
        ("sdar", lambda: SDARDouble(block=4), dict(tiny_kwargs, tokenizer=SDAR_TOKENIZER)),
        ("dream", lambda: DreamDouble(), dict(tiny_kwargs)),
    ]


SETUPS = {name: (factory, kwargs) for name, factory, kwargs in setups()}


def prompts(batch: int = 2, length: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 16, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_seqd_equals_an_independent_plain_sampler():
    model = tiny_model()
    for threshold in (None, 0.6):
        expected = plain_semi_ar_sampler(model, prompts(), 8, 4, 4, MASK, threshold=threshold)
        result = generate(model, prompts(), gen_length=8, block_length=4, steps=4, rcd=False,
                          remasking="fixed" if threshold is None else "threshold",
                          threshold=threshold, stop_at_eos=False)
        assert torch.equal(result.sequences, expected)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_seqd_with_a_cache_equals_an_independent_cached_sampler(cache):
    model = tiny_model()
    expected = plain_cached_sampler(model, prompts(), 8, 4, 4, MASK, cache)
    result = generate(model, prompts(), gen_length=8, block_length=4, steps=4, rcd=False,
                      cache=cache, stop_at_eos=False)
    assert torch.equal(result.sequences, expected)


def test_block_diffusion_kv_cache_equals_uncached_block_decoding():
    """A block-causal model's cache is exact: decoding each block by forwarding the whole
    prefix without a cache (written here, prompt tail inside the first block) gives the same
    tokens as the cached loop."""
    model = tiny_model("block_causal", 4)
    prompt = prompts(length=5)
    x = torch.full((2, 16), MASK)
    x[:, :5] = prompt
    for start in (4, 8, 12):
        masked_at_start = (x[:, start:start + 4] == MASK).sum(1)
        for step in range(2):
            logits = model(input_ids=x[:, :start + 4]).logits[:, start:]
            confidence, tokens = torch.softmax(logits, -1).max(-1)
            for row in range(2):
                masked = x[row, start:start + 4] == MASK
                count = int(masked_at_start[row])
                quota = count // 2 + (step < count % 2)
                scores = torch.where(masked, confidence[row], torch.tensor(-1.0))
                for column in torch.argsort(scores, descending=True, stable=True)[:quota]:
                    x[row, start + column] = tokens[row, column]
    result = generate(model, prompt, gen_length=8, block_length=4, steps=4, rcd=False,
                      stop_at_eos=False)
    assert torch.equal(result.tokens, x[:, 5:13])


def test_seqd_equals_plain_sampler_for_dream_shifted_logits():
    model = DreamDouble()
    prompt = torch.tensor([[3, 4, 5]])
    expected = plain_semi_ar_sampler(model, prompt, 8, 4, 4, DREAM_MASK, shift=True)
    result = generate(model, prompt, gen_length=8, block_length=4, steps=4, rcd=False)
    assert torch.equal(result.sequences, expected)


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("remasking", ["fixed", "threshold"])
def test_alpha_zero_equals_seqd_in_every_loop_and_cache_mode(name, remasking):
    factory, kwargs = SETUPS[name]
    model = factory()
    common = dict(kwargs, remasking=remasking, threshold=0.5, stop_at_eos=False)
    seqd = generate(model, prompts(), rcd=False, **common)
    zero = generate(model, prompts(), rcd=True, strategy="fixed", alpha_scale=0.0, **common)
    assert torch.equal(seqd.tokens, zero.tokens)
    rcd = generate(model, prompts(), rcd=True, strategy="fixed", alpha_scale=1.0, **common)
    assert not torch.equal(seqd.tokens, rcd.tokens)  # the residual path is really exercised


@pytest.mark.parametrize("name", ["tiny-none", "tiny-prefix", "tiny-dual",
                                  "tiny-block-diffusion", "llada-dual", "sdar"])
@pytest.mark.parametrize("init", ["cold", "self"])
def test_batch_equals_single_runs(name, init):
    factory, kwargs = SETUPS[name]
    model = factory()
    batch = prompts(batch=3, seed=4)
    common = dict(kwargs, remasking="threshold", threshold=0.6, init=init)
    together = generate(model, batch, **common).tokens
    for row in range(3):
        single = generate(model, batch[row:row + 1], **common).tokens
        assert torch.equal(together[row:row + 1], single)


@pytest.mark.parametrize("init", ["reference", "dirichlet"])
def test_reference_and_dirichlet_init_change_decoding_and_are_counted(init):
    model, reference = tiny_model(seed=0), tiny_model(seed=3)
    common = dict(gen_length=8, block_length=4, steps=8, stop_at_eos=False, seed=0)
    cold = generate(model, prompts(), **common)
    warm = generate(model, prompts(), init=init, ref_model=reference, **common)
    assert not torch.equal(cold.tokens, warm.tokens)
    assert warm.stats.reference_forwards == (2 if init == "reference" else 0)
    assert warm.stats.forward_passes == cold.stats.forward_passes == 8


def test_stats_count_forwards_steps_and_tokens():
    model = tiny_model()
    result = generate(model, prompts(), gen_length=8, block_length=4, steps=4, stop_at_eos=False)
    stats = result.stats
    assert (stats.forward_passes, stats.denoising_steps, stats.tokens) == (4, 4, 16)
    assert stats.tokens_per_step == 2.0 and stats.tokens_per_forward == 2.0
    assert stats.wall_time_s > 0 and "tok/step" in stats.summary()

    block_causal = tiny_model("block_causal", 4)
    result = generate(block_causal, prompts(length=4), gen_length=8, block_length=4, steps=4,
                      stop_at_eos=False)
    # prefill of the prompt block + 4 steps + one commit pass between the two blocks
    assert (result.stats.forward_passes, result.stats.denoising_steps) == (6, 4)

    fast = generate(model, prompts(), gen_length=8, block_length=4, steps=8,
                    remasking="threshold", threshold=1e-6, stop_at_eos=False)
    assert fast.stats.denoising_steps == 2  # everything above the threshold: one step a block


class EosModel(torch.nn.Module):
    """The tiny model with a large bonus on EOS in positions >= `from_position`."""

    def __init__(self, from_position: int):
        super().__init__()
        self.inner = tiny_model()
        self.config = self.inner.config
        self.from_position = from_position

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False):
        out = self.inner(input_ids=input_ids, inputs_embeds=inputs_embeds)
        out.logits[:, self.from_position:, EOS] += 50.0
        return out


def test_eos_stops_after_the_block_and_fills_the_rest():
    model = EosModel(from_position=5)
    result = generate(model, prompts(), gen_length=12, block_length=4, steps=12)
    assert result.stats.blocks == 1  # every row produced EOS in the first block
    assert (result.tokens[:, 2:] == EOS).all()
    assert result.stats.tokens == 2 * 4


def test_text_output_with_a_tokenizer():
    symbols = [chr(ord("a") + i) for i in range(11)]
    tokenizer = build_tiny_tokenizer(symbols)
    model = tiny_model()
    result = generate(model, ["a b c", "d e f"], tokenizer=tokenizer, gen_length=8,
                      block_length=4, steps=4)
    assert result.prompt_length == 3 and len(result.text) == 2
    for row, text in zip(result.tokens.tolist(), result.text, strict=True):
        kept = row[:row.index(EOS)] if EOS in row else row
        assert text == tokenizer.decode(kept, skip_special_tokens=True)


def test_sampling_is_seeded():
    model = tiny_model()
    common = dict(gen_length=8, block_length=4, steps=4, temperature=1.0, stop_at_eos=False)
    first = generate(model, prompts(), seed=0, **common).tokens
    assert torch.equal(first, generate(model, prompts(), seed=0, **common).tokens)
    assert not torch.equal(first, generate(model, prompts(), seed=1, **common).tokens)


def test_trace_records_commits_and_alpha():
    model = tiny_model()
    result = generate(model, prompts(), gen_length=8, block_length=4, steps=4, trace=True,
                      stop_at_eos=False)
    assert len(result.trace) == 4
    for block in (0, 1):
        committed = torch.stack([r.committed for r in result.trace if r.block == block]).sum(0)
        assert (committed == 1).all() and committed.shape == (2, 4)  # each position once
    for record in result.trace:
        masked = record.tokens == MASK
        assert (record.alpha[~masked] == 0).all()
        if masked.any():
            assert (record.alpha[masked] > 0).all()
    for record in result.trace:
        given = record.alpha_in > 0
        if record.step == 0:
            assert not given.any()  # cold init: the block's first step sees plain [M]
        else:  # every position masked going into the step (committed now or still masked)
            assert torch.equal(given, (record.tokens == MASK) | record.committed)
    warm = generate(model, prompts(), gen_length=8, block_length=4, steps=4, trace=True,
                    init="reference", ref_model=tiny_model(seed=2), stop_at_eos=False)
    assert all((r.alpha_in > 0).all() for r in warm.trace if r.step == 0)
    seqd = generate(model, prompts(), gen_length=8, block_length=4, steps=4, trace=True,
                    rcd=False, stop_at_eos=False)
    assert all((r.alpha == 0).all() and (r.alpha_in == 0).all() for r in seqd.trace)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gen_length=10, block_length=4), "not a multiple of block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "multiple of the number of blocks"),
    (dict(gen_length=64, block_length=4), "exceed the model's context of 64"),
    (dict(cache="triple"), "cache must be one of"),
    (dict(remasking="random"), "remasking must be one of"),
    (dict(remasking="threshold", threshold=None), "threshold must be in"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), prompts(), **kwargs)


def test_bad_prompts_and_models_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="contains the mask token"):
        generate(model, torch.tensor([[5, MASK, 6]]), gen_length=4, block_length=4)
    with pytest.raises(ValueError, match="does not support prompts of different lengths"):
        generate(LLaDADouble(), [[5, 6], [5, 6, 7]], gen_length=4, block_length=4)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, "a b", gen_length=4, block_length=4)
    with pytest.raises(ValueError, match="model's block_length 4"):
        generate(tiny_model("block_causal", 4), prompts(), gen_length=8, block_length=8)
    with pytest.raises(ValueError, match="not supported for dream"):
        generate(DreamDouble(), prompts(), gen_length=4, block_length=4, cache="prefix")
    unknown = DreamDouble()
    unknown.config = SimpleNamespace(model_type="mystery", vocab_size=unknown.config.vocab_size)
    with pytest.raises(ValueError, match="no mask token id"):
        generate(unknown, prompts(), gen_length=4, block_length=4)
    assert LLADA_MASK == generate(LLaDADouble(), prompts(), gen_length=4,
                                  block_length=4).sequences.new_tensor(LLADA_MASK).item()


@pytest.mark.parametrize("remasking", ["fixed", "threshold"])
def test_a_model_that_predicts_mask_everywhere_still_finishes(remasking):
    # Untrained models can rank [MASK] first; committing it would leave the block masked forever.
    model = tiny_model()
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK] = 0.0

    def prefer_mask(module, inputs, output):
        output.logits[..., MASK] += 1e4
        return output

    model.register_forward_hook(prefer_mask)
    result = generate(model, prompts(), gen_length=8, block_length=4, steps=4, rcd=True,
                      init="self", remasking=remasking, threshold=0.9, stop_at_eos=False)
    generated = result.sequences[:, 3:]
    assert not (generated == MASK).any()
    assert result.stats.denoising_steps <= 4
