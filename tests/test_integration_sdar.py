"""The input-embedding hook (engines that take no inputs_embeds: Fast-dLLM v2, D2F's vLLM
engine, JetEngine) on a flat token batch of two requests, and the SDAR sampler patch."""

from __future__ import annotations

import types

import pytest
import torch

from rcd_ext.integrations.engine_patching import RCDOptions
from rcd_ext.integrations.sdar import EmbeddingHookRCD, patch_sdar
from rcd_ext.ops import residual_context
from tests.engine_doubles.models import LLaDADouble

MASK = 47


def test_hook_injects_stored_residuals_per_request_and_absolute_position():
    embedding = LLaDADouble().get_input_embeddings()
    table = embedding.weight
    hook = EmbeddingHookRCD(embedding, MASK)
    hook.reset(2)
    ids = torch.tensor([5, MASK, MASK, MASK])
    positions = torch.tensor([10, 11, 12, 11])  # the last token: request 1, position 11
    rows = torch.tensor([0, 0, 0, 1])
    hook.prepare(ids, positions, rows)
    assert torch.equal(embedding(ids), table[ids])  # nothing stored yet: plain
    logits = torch.randn(4, table.shape[0], generator=torch.Generator().manual_seed(0))
    hook.update(logits)
    expected, _ = residual_context(logits, table, table[MASK])
    committed = torch.tensor([5, 9, MASK, MASK])  # request 0 committed position 11
    hook.prepare(committed, positions, rows)
    out = embedding(committed)
    assert torch.equal(out[:2], table[committed[:2]])
    assert torch.allclose(out[2:], expected[2:], atol=1e-6)
    hook.update(logits)
    hook.prepare(ids, positions, rows)  # position 11 masked again: its residual is gone
    assert torch.equal(embedding(ids)[1], table[MASK])
    hook.remove()
    assert torch.equal(embedding(ids), table[ids])


def test_hook_refuses_warm_inits_and_mismatched_batches():
    embedding = LLaDADouble().get_input_embeddings()
    with pytest.raises(ValueError, match="init='cold'"):
        EmbeddingHookRCD(embedding, MASK, RCDOptions(init="self"))
    hook = EmbeddingHookRCD(embedding, MASK)
    hook.prepare(torch.tensor([MASK, MASK]), torch.tensor([0, 1]))
    hook.update(torch.zeros(2, embedding.weight.shape[0]))
    hook.prepare(torch.tensor([MASK, MASK]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="announced 2 tokens"):
        embedding(torch.tensor([MASK, MASK, MASK]))


def test_sdar_patch_wraps_the_model_and_flag_off_calls_the_original():
    seen = []

    def block_diffusion_generate(model, prompt, mask_id, gen_length=128, block_length=8,
                                 denoising_steps=8, temperature=1.0):
        seen.append(model)
        return prompt["input_ids"]

    module = types.ModuleType("sdar_generate_double")
    module.block_diffusion_generate = block_diffusion_generate
    model = LLaDADouble()
    patch = patch_sdar(module)
    prompt = {"input_ids": torch.tensor([[1, 2, 3]])}
    module.block_diffusion_generate(model, prompt, MASK, rcd=False)
    module.block_diffusion_generate(model, prompt, MASK)
    assert seen[0] is model and seen[1] is patch.last_rcd_model
    assert patch.last_rcd_model.mask_id == MASK
    assert patch.last_rcd_model.residual_config.scope == "all"
    patch.undo()
    assert module.block_diffusion_generate is block_diffusion_generate
