"""rcd_ext.wrap: injection through the model's input, positions of slice calls, init, resets,
and a plain sampler driven by the wrapper equals rcd_ext.generate."""

from __future__ import annotations

import pytest
import torch
from test_decoding_doubles import (
    DREAM_MASK,
    LLADA_MASK,
    DreamDouble,
    LLaDADouble,
    StubTokenizer,
    plain_semi_ar_sampler,
    tiny_model,
)
from test_residual import hand_residual

from rcd_ext.decoding.generation import generate
from rcd_ext.residual import dirichlet_logits
from rcd_ext.wrapper import wrap

MASK = 1


def capture_inputs(model):
    """Record the kwargs of every forward call of `model`."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(dict(kwargs))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def table(model):
    return model.get_input_embeddings().weight.detach()


def test_disabled_wrapper_passes_calls_through_unchanged():
    model = tiny_model()
    x = torch.tensor([[5, 6, MASK, MASK]])
    plain = model(x).logits
    out = wrap(model, enabled=False)(x).logits
    assert torch.equal(out, plain)


def test_alpha_zero_is_bit_identical_to_plain_calls():
    model = tiny_model()
    rcd = wrap(model, strategy="fixed", alpha_scale=0.0)
    x = torch.tensor([[5, 6, MASK, MASK, MASK]])
    for _ in range(3):
        assert torch.equal(rcd(x).logits, model(x).logits)


def test_second_call_injects_previous_residual_at_masked_positions_only():
    model = tiny_model()
    calls = capture_inputs(model)
    rcd = wrap(model)
    x = torch.tensor([[5, 6, MASK, MASK, MASK, MASK]])
    first = rcd(x).logits
    assert torch.equal(calls[-1]["inputs_embeds"], table(model)[x])  # cold start: plain [M]
    x[0, 3] = 9  # the sampler committed position 3
    rcd(x)
    embeds = calls[-1]["inputs_embeds"][0]
    expected, _ = hand_residual(first[0], table(model), MASK)
    for column in range(6):
        if x[0, column] == MASK:
            torch.testing.assert_close(embeds[column], expected[column])
        else:
            assert torch.equal(embeds[column], table(model)[x[0, column]])


def test_residuals_are_computed_only_for_positions_left_masked():
    model = tiny_model()
    rcd = wrap(model)
    x = torch.tensor([[5, 6, MASK, MASK, MASK, MASK]])
    rcd(x)
    assert rcd.stats.residual_rows == 0  # nothing computed until the sampler has committed
    x[0, 2:4] = torch.tensor([7, 8])
    rcd(x)
    assert rcd.stats.residual_rows == 2  # the two positions still masked, not all four


def test_prefix_cache_slice_uses_absolute_positions_from_cache_length():
    model = tiny_model()
    calls = capture_inputs(model)
    rcd = wrap(model)
    x = torch.tensor([[5, 6, 7, MASK, MASK, MASK]])
    full = rcd(x, use_cache=True)
    prefix = full.past_key_values.crop(3)
    rcd(x[:, 3:], past_key_values=prefix)
    expected, _ = hand_residual(full.logits[0, 3:], table(model), MASK)
    torch.testing.assert_close(calls[-1]["inputs_embeds"][0], expected)


def test_position_ids_and_replace_position_give_absolute_positions():
    model = tiny_model()
    calls = capture_inputs(model)
    rcd = wrap(model)
    x = torch.tensor([[5, 6, MASK, MASK, MASK, MASK]])
    full = rcd(x, use_cache=True)
    rcd(x[:, 4:], past_key_values=full.past_key_values.crop(2),
        position_ids=torch.tensor([[4, 5]]))
    expected, _ = hand_residual(full.logits[0, 4:], table(model), MASK)
    torch.testing.assert_close(calls[-1]["inputs_embeds"][0], expected)

    llada = LLaDADouble()
    llada_calls = capture_inputs(llada)
    rcd = wrap(llada)
    x = torch.full((1, 10), LLADA_MASK)
    x[0, :4] = torch.tensor([3, 4, 5, 6])
    full = rcd(x, use_cache=True)
    replace = torch.zeros(1, 10, dtype=torch.bool)
    replace[0, 6:8] = True
    rcd(x[:, 6:8], past_key_values=full.past_key_values, use_cache=True, replace_position=replace)
    expected, _ = hand_residual(full.logits[0, 6:8], table(llada), LLADA_MASK)
    torch.testing.assert_close(llada_calls[-1]["inputs_embeds"][0], expected)


def test_block_scope_injects_only_inside_the_current_block():
    model = tiny_model()
    calls = capture_inputs(model)
    rcd = wrap(model, block_length=2)
    x = torch.tensor([[5, 6, MASK, MASK, MASK, MASK]])
    rcd(x)
    rcd(x)
    embeds = calls[-1]["inputs_embeds"][0]
    assert not torch.equal(embeds[2], table(model)[MASK])
    assert torch.equal(embeds[4:], table(model)[x[0, 4:]])  # the next block: plain [M]


def test_new_prompt_resets_residuals():
    model = tiny_model()
    calls = capture_inputs(model)
    rcd = wrap(model)
    first = torch.tensor([[5, 6, MASK, MASK]])
    rcd(first)
    rcd(torch.tensor([[7, 6, MASK, MASK]]))  # another prompt, same shape
    assert torch.equal(calls[-1]["inputs_embeds"], table(model)[torch.tensor([[7, 6, 1, 1]])])
    rcd(first)
    rcd(torch.tensor([[5, 6, MASK, MASK], [5, 6, MASK, MASK]]))  # batch size changed
    assert torch.equal(calls[-1]["inputs_embeds"][0], table(model)[first[0]])


def test_reference_init_uses_the_reference_logits_on_the_first_call():
    model, reference = tiny_model(seed=0), tiny_model(seed=1)
    calls = capture_inputs(model)
    rcd = wrap(model, ref_model=reference, init="reference")
    x = torch.tensor([[5, 6, MASK, MASK]])
    rcd(x)
    expected, _ = hand_residual(reference(x).logits[0, 2:], table(model), MASK)
    torch.testing.assert_close(calls[-1]["inputs_embeds"][0, 2:], expected)
    assert rcd.stats.reference_forwards == 1
    rcd(x)
    assert rcd.stats.reference_forwards == 1  # only positions without a residual are primed


def test_self_init_uses_one_extra_plain_target_forward():
    model = tiny_model()
    calls = capture_inputs(model)
    rcd = wrap(model, init="self")
    x = torch.tensor([[5, 6, MASK, MASK]])
    rcd(x)
    expected, _ = hand_residual(model(x).logits[0, 2:], table(model), MASK)
    torch.testing.assert_close(calls[-2]["inputs_embeds"][0, 2:], expected)
    assert rcd.stats.self_init_forwards == 1


def test_dirichlet_init_injects_a_seeded_dirichlet_residual():
    x = torch.tensor([[5, 6, MASK, MASK]])

    def injected(seed: int) -> torch.Tensor:
        model = tiny_model()
        calls = capture_inputs(model)
        wrap(model, init="dirichlet", seed=seed)(x)
        return calls[-1]["inputs_embeds"][0, 2:]

    model = tiny_model()
    draw = dirichlet_logits(2, 16, generator=torch.Generator().manual_seed(0))
    expected, _ = hand_residual(draw, table(model), MASK)
    torch.testing.assert_close(injected(0), expected)
    assert torch.equal(injected(0), injected(0))
    assert not torch.equal(injected(0), injected(1))


def test_dream_residuals_are_taken_after_the_logit_shift():
    model = DreamDouble()
    rcd = wrap(model)
    x = torch.full((1, 6), DREAM_MASK)
    x[0, :2] = torch.tensor([3, 4])
    raw = rcd(x).logits
    expected, _ = hand_residual(raw[0, 1:5], table(model), DREAM_MASK)
    rcd.flush()  # residuals are stored lazily, at the next call
    embeds = rcd.state.inputs_embeds(x, torch.arange(6)[None])
    torch.testing.assert_close(embeds[0, 2:], expected)


@pytest.mark.parametrize("threshold", [None, 0.7])
def test_wrapped_plain_sampler_equals_generate(threshold):
    model = tiny_model()
    prompt = torch.tensor([[5, 9, 7], [8, 6, 12]])
    kwargs = dict(gen_length=8, block_length=4, steps=4)
    rcd = wrap(model, block_length=4)
    sampled = plain_semi_ar_sampler(rcd, prompt, mask_id=MASK, threshold=threshold, **kwargs)
    result = generate(model, prompt, remasking="fixed" if threshold is None else "threshold",
                      threshold=threshold, stop_at_eos=False, **kwargs)
    assert torch.equal(sampled[:, 3:], result.tokens)
    plain = plain_semi_ar_sampler(model, prompt, mask_id=MASK, threshold=threshold, **kwargs)
    assert not torch.equal(plain, sampled)  # residuals did change the decoding


def test_reference_init_refuses_mismatched_reference():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs ref_model"):
        wrap(model, init="reference")
    with pytest.raises(ValueError, match="reference vocab 20 != target vocab 16"):
        wrap(model, init="reference", ref_model=tiny_model(vocab_size=20))
    tokenizer = StubTokenizer({"a": 5})
    other = StubTokenizer({"b": 5})
    with pytest.raises(ValueError, match="reference tokenizer differs"):
        wrap(model, init="reference", ref_model=tiny_model(seed=1), tokenizer=tokenizer,
             ref_tokenizer=other)


def test_positional_calls_are_understood():
    model = DreamDouble()
    calls = capture_inputs(model)
    rcd = wrap(model)
    x = torch.full((1, 6), DREAM_MASK)
    x[0, :2] = torch.tensor([3, 4])
    raw = rcd(x, None, torch.arange(6)[None]).logits  # Dream samplers call positionally
    rcd(x, None, torch.arange(6)[None])
    expected, _ = hand_residual(raw[0, 1:5], table(model), DREAM_MASK)
    torch.testing.assert_close(calls[-1]["inputs_embeds"][0, 2:], expected)


def test_wrapper_without_blocks_equals_generate_with_scope_all():
    model = tiny_model()
    prompt = torch.tensor([[5, 9, 7]])
    sampled = plain_semi_ar_sampler(wrap(model), prompt, 8, 4, 4, mask_id=MASK)
    result = generate(model, prompt, gen_length=8, block_length=4, steps=4, scope="all",
                      stop_at_eos=False)
    assert torch.equal(sampled[:, 3:], result.tokens)
    in_block = generate(model, prompt, gen_length=8, block_length=4, steps=4, stop_at_eos=False)
    assert not torch.equal(in_block.tokens, result.tokens)  # the scope matters here


class IdsOnly(torch.nn.Module):
    """A model whose forward takes token ids only."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()
        self.config = self.inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids)


def test_hook_injection_equals_inputs_embeds_injection():
    x = torch.tensor([[5, 6, MASK, MASK, MASK]])
    by_embeds = wrap(tiny_model())
    by_hook = wrap(IdsOnly(), injection="hook")
    for step in range(3):
        expected, got = by_embeds(x).logits, by_hook(x).logits
        assert torch.equal(expected, got)
        x[0, 2 + step] = 7
    assert by_hook.stats.residual_rows > 0
    by_hook.remove()
    plain = IdsOnly()(x).logits
    assert torch.equal(by_hook(x).logits, plain)


def test_model_that_cannot_take_embeddings_is_refused():
    with pytest.raises(TypeError, match="no inputs_embeds"):
        wrap(IdsOnly())
    with pytest.raises(TypeError, match="no inputs_embeds"):
        generate(IdsOnly(), torch.tensor([[5, 6]]), gen_length=4, block_length=4)
    seqd = generate(IdsOnly(), torch.tensor([[5, 6]]), gen_length=4, block_length=4, rcd=False)
    assert seqd.tokens.shape == (1, 4)


def test_a_forward_that_hides_input_ids_is_refused():
    # A PEFT-style forward(*args, **kwargs) gives the wrapper no input_ids to inject at:
    # passing the call through would silently decode without RCD.
    from test_decoding_doubles import tiny_model

    from rcd_ext.wrapper import wrap

    inner = tiny_model()

    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def get_input_embeddings(self):
            return inner.get_input_embeddings()

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    rcd_model = wrap(Opaque(), mask_id=1, block_length=4)
    with pytest.raises(TypeError, match="cannot find input_ids"):
        rcd_model(torch.tensor([[5, 6, 1, 1]]))


def test_a_peft_model_is_unwrapped_to_its_base_model():
    # PEFT's PeftModel hides argument names behind forward(*args, **kwargs) but gives its base
    # model (LoRA layers inside) through get_base_model(): the wrapper calls that one.
    inner = tiny_model()

    class PeftShaped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = inner

        def get_base_model(self):
            return self.base

        def forward(self, *args, **kwargs):
            return self.base(*args, **kwargs)

    through_peft = wrap(PeftShaped(), mask_id=MASK, block_length=4)
    direct = wrap(inner, mask_id=MASK, block_length=4)
    assert through_peft.model is inner
    x = torch.tensor([[5, 6, MASK, MASK]])
    through_peft(x)
    direct(x)
    assert torch.equal(through_peft(x).logits, direct(x).logits)
    assert through_peft.stats.residual_rows == direct.stats.residual_rows > 0


def host_reads(call) -> int:
    """Values the call reads back to the host (`int()`/`bool()`/`.item()` on a tensor, and
    `nonzero`, whose size must be read), counted at the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "nonzero", "is_nonzero"):
                Count.reads += 1
            return func(*args, **(kwargs or {}))

    with Count():
        call()
    return Count.reads


def test_a_decode_step_reads_back_three_numbers_beyond_the_model():
    # new-prompt check, the rows to write, the new pool rows they need: a lean loop's budget
    # (it was 13 when the bookkeeping branched on the host at every stage)
    model = tiny_model()
    rcd = wrap(model, block_length=4)
    x = torch.tensor([[5, 6, MASK, MASK, MASK, MASK], [7, 8, MASK, MASK, MASK, MASK]])
    rcd(x)
    x[:, 2] = 9
    rcd(x)  # the residuals of the three masked columns now take pool rows
    x[:, 3] = 10
    plain = host_reads(lambda: model(x))
    assert host_reads(lambda: rcd(x)) - plain <= 3


def test_a_reused_wrapper_scopes_a_new_prompt_like_a_fresh_one():
    # the block layout is kept between calls: a new prompt (another origin) must rebuild it
    model = tiny_model()
    calls = capture_inputs(model)
    rcd = wrap(model, block_length=2)
    first = torch.tensor([[5, 6, MASK, MASK, MASK, MASK]])
    rcd(first)
    rcd(first)
    second = torch.tensor([[7, 8, 9, MASK, MASK, MASK]])  # origin 3, not 2
    for reused in (rcd, wrap(model, block_length=2)):
        x = second.clone()
        reused(x)
        x[0, 3] = 11
        reused(x)
        embeds = calls[-1]["inputs_embeds"][0]
        assert not torch.equal(embeds[4], table(model)[MASK])  # the block [3, 4]
        assert torch.equal(embeds[5], table(model)[MASK])  # the next block [5]
