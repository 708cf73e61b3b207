"""Fast-dLLM integration: the patched LLaDA and Dream samplers on from-scratch engine doubles.

Checks: flag off is the unpatched engine bit for bit; the patch rebinds names imported by the
engine's scripts and undoes cleanly; flag on injects exactly at masked positions of the current
block with the right absolute positions in every cache mode (checked against an independent
oracle); alpha 0 leaves the output bit-identical (the embedding path itself is inert).
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from rcd_ext.integrations.fast_dllm import patch_fast_dllm, patch_fast_dllm_dream
from tests.engine_doubles import fast_dllm_dream, fast_dllm_generate
from tests.engine_doubles.models import DreamDouble, LLaDADouble
from tests.engine_doubles.oracle import SamplerIds, check_injection, shift_own_first

MASK = 47
SAMPLERS = ("generate", "generate_with_prefix_cache", "generate_with_dual_cache")
PROMPT = torch.tensor([[3, 9, 14, 2, 27]])
SETTINGS = {"steps": 8, "gen_length": 12, "block_length": 4, "mask_id": MASK}


@pytest.fixture
def generate_module():
    """A fresh copy of the double `generate` module, registered as top-level `generate` (as
    Fast-dLLM's scripts import it), plus a fake `eval_llada` that imported its samplers."""
    module = types.ModuleType("generate")
    module.__dict__.update({k: v for k, v in vars(fast_dllm_generate).items()
                            if not k.startswith("__")})
    eval_script = types.ModuleType("eval_llada_double")
    for name in SAMPLERS:
        setattr(eval_script, name, getattr(module, name))
    sys.modules["generate"], sys.modules["eval_llada_double"] = module, eval_script
    yield module
    del sys.modules["generate"], sys.modules["eval_llada_double"]


def run(module, name, model, threshold=None, **extra):
    return getattr(module, name)(model, PROMPT.clone(), **SETTINGS, threshold=threshold, **extra)


@pytest.mark.parametrize("threshold", [None, 0.99])
def test_flag_off_is_the_unpatched_engine_bit_for_bit(generate_module, threshold):
    plain = {name: run(generate_module, name, LLaDADouble(), threshold) for name in SAMPLERS}
    patch = patch_fast_dllm(generate_module, rcd=False)
    for name in SAMPLERS:
        x, nfe = run(generate_module, name, LLaDADouble(), threshold)
        assert torch.equal(x, plain[name][0]) and nfe == plain[name][1]
    patch.undo()
    patch = patch_fast_dllm("generate")  # on by default; rcd=False per call turns it off
    for name in SAMPLERS:
        x, nfe = run(generate_module, name, LLaDADouble(), threshold, rcd=False)
        assert torch.equal(x, plain[name][0]) and nfe == plain[name][1]
    patch.undo()


def test_patch_rebinds_imported_names_and_undo_restores_them(generate_module):
    originals = {name: getattr(generate_module, name) for name in SAMPLERS}
    eval_script = sys.modules["eval_llada_double"]
    patch = patch_fast_dllm(generate_module)
    for name in SAMPLERS:
        assert getattr(eval_script, name) is getattr(generate_module, name)
        assert getattr(generate_module, name) is not originals[name]
        assert f"eval_llada_double.{name}" in patch.rebound
    again = patch_fast_dllm(generate_module, t_res=0.5)  # re-patching starts from the original
    assert again.originals == {name: originals[name] for name in again.originals}
    again.undo()
    for name in SAMPLERS:
        assert getattr(eval_script, name) is originals[name]
        assert getattr(generate_module, name) is originals[name]


def test_patched_signature_lists_the_keyword_only_extras(generate_module):
    import inspect

    patch_fast_dllm(generate_module)
    parameters = inspect.signature(generate_module.generate_with_dual_cache).parameters
    assert list(parameters)[:9] == ["model", "prompt", "steps", "gen_length", "block_length",
                                    "temperature", "remasking", "mask_id", "threshold"]
    for name in ("rcd", "ref_model", "t_res", "init", "suffix"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", SAMPLERS)
def test_alpha_zero_is_bit_identical(generate_module, name):
    plain = run(generate_module, name, LLaDADouble(), 0.3)
    patch_fast_dllm(generate_module, alpha_scale=0.0)
    x, nfe = run(generate_module, name, LLaDADouble(), 0.3)
    assert torch.equal(x, plain[0]) and nfe == plain[1]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("threshold", [None, 0.99])
def test_flag_on_injects_at_masked_positions_with_absolute_positions(generate_module, name,
                                                                     threshold, monkeypatch):
    spy = SamplerIds().install(monkeypatch)
    patch = patch_fast_dllm(generate_module)
    model = LLaDADouble()
    run(generate_module, name, model, threshold)
    embed = model.get_input_embeddings().weight
    injected = check_injection(model.calls, spy.ids, embed, MASK, PROMPT.shape[1], 4)
    assert injected > 0
    assert patch.last_rcd_model.stats.target_forwards == len(model.calls)
    if name == "generate_with_prefix_cache":
        # the steps ran on x[:, s:] views over a cache of length s
        assert any(int(call.positions[0, 0]) > PROMPT.shape[1] for call in model.calls)


def test_suffix_residual_injects_after_the_block_and_mask_does_not(generate_module):
    model = LLaDADouble()
    patch_fast_dllm(generate_module, suffix="residual")
    run(generate_module, "generate", model)
    end_of_first_block = PROMPT.shape[1] + 4
    mask_embed = model.get_input_embeddings().weight[MASK]
    second = model.calls[1]  # a step of the first block: later blocks are masked
    assert not torch.equal(second.embeds[0, end_of_first_block:],
                           mask_embed.expand_as(second.embeds[0, end_of_first_block:]))
    model = LLaDADouble()
    patch_fast_dllm(generate_module, suffix="mask")
    run(generate_module, "generate", model)
    second = model.calls[1]
    assert torch.equal(second.embeds[0, end_of_first_block:],
                       mask_embed.expand_as(second.embeds[0, end_of_first_block:]))


def test_batched_prompts_decode_like_single_prompts(generate_module):
    patch_fast_dllm(generate_module)
    prompts = torch.tensor([[3, 9, 14, 2, 27], [5, 1, 30, 8, 11]])
    batched, _ = generate_module.generate_with_prefix_cache(LLaDADouble(), prompts, **SETTINGS)
    for row in range(2):
        single, _ = generate_module.generate_with_prefix_cache(LLaDADouble(), prompts[row:row + 1],
                                                               **SETTINGS)
        assert torch.equal(batched[row], single[0])


# ---- Dream ------------------------------------------------------------------------------------
def dream_model():
    model = DreamDouble()
    model.generation_config = types.SimpleNamespace(mask_token_id=MASK, max_length=13)
    return model


def bind(model, mixin=fast_dllm_dream.DreamGenerationMixin):
    # as Fast-dLLM's dream/eval.py does
    model.diffusion_generate = types.MethodType(mixin.diffusion_generate, model)
    model._sample = types.MethodType(mixin._sample, model)
    return model


@pytest.fixture
def mixin():
    """A copy of the Dream mixin double, so that patching the class stays local to a test."""
    return type("DreamGenerationMixin", (), dict(vars(fast_dllm_dream.DreamGenerationMixin)))


@pytest.mark.parametrize("dual_cache", [False, True])
def test_dream_flag_off_is_bit_identical_and_on_injects_after_the_shift(mixin, dual_cache,
                                                                         monkeypatch):
    spy = SamplerIds().install(monkeypatch)
    prompt = PROMPT.clone()
    plain = bind(dream_model(), mixin).diffusion_generate(prompt, block_length=4,
                                                          dual_cache=dual_cache, threshold=0.3)
    patch = patch_fast_dllm_dream(mixin)  # class-level, before binding
    off = bind(dream_model(), mixin).diffusion_generate(prompt, block_length=4,
                                                        dual_cache=dual_cache, threshold=0.3,
                                                        rcd=False)
    assert torch.equal(off, plain)
    model = bind(dream_model(), mixin)
    model.diffusion_generate(prompt, block_length=4, dual_cache=dual_cache, threshold=0.3)
    assert "forward" not in vars(model)  # the forward swap is undone
    embed = model.get_input_embeddings().weight
    assert check_injection(model.calls, spy.ids, embed, MASK, prompt.shape[1], 4,
                           shift=shift_own_first) > 0
    patch.undo()
    assert mixin.diffusion_generate is fast_dllm_dream.DreamGenerationMixin.diffusion_generate


def test_dream_instance_patch_and_alpha_zero():
    prompt = PROMPT.clone()
    plain = bind(dream_model()).diffusion_generate(prompt, block_length=4, threshold=0.3)
    model = bind(dream_model())
    patch = patch_fast_dllm_dream(model, alpha_scale=0.0)
    assert torch.equal(model.diffusion_generate(prompt, block_length=4, threshold=0.3), plain)
    patch.undo()
    assert model.diffusion_generate.__func__ is \
        fast_dllm_dream.DreamGenerationMixin.diffusion_generate
    copy.deepcopy(patch.options)
