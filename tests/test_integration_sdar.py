"""The SDAR sampler patch (the real sampler is exercised in test_integration_real_engines)."""

from __future__ import annotations

import types

import torch

from rcd_ext.integrations.sdar import patch_sdar
from tests.engine_doubles.models import LLaDADouble

MASK = 47


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
