"""D2F integration: the patched Hugging Face block sampler on a from-scratch engine double
(several blocks in flight, update_kvcache, inference mode, a PEFT-style wrapper)."""

from __future__ import annotations

import torch
from torch import nn

from rcd_ext.integrations.d2f import patch_d2f
from tests.engine_doubles.d2f import D2FLLaDALM
from tests.engine_doubles.models import D2FLLaDADouble
from tests.engine_doubles.oracle import SamplerIds, check_injection

MASK = 47
PROMPT = torch.tensor([[3, 9, 14, 2, 27]])


class PeftLike(nn.Module):
    """PEFT's PeftModel shape: forward(*args, **kwargs) and get_base_model()."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base_model = model

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)


def lm_class():
    return type("D2FLM", (D2FLLaDALM,), {})


def test_flag_off_is_the_unpatched_sampler_and_undo_restores():
    cls = lm_class()
    plain = cls(D2FLLaDADouble(), MASK)._generate_block_single(PROMPT)
    patch = patch_d2f(cls, rcd=False)
    assert cls(D2FLLaDADouble(), MASK)._generate_block_single(PROMPT) == plain
    patch.undo()
    assert "_generate_block_single" not in vars(cls) or \
        cls._generate_block_single is D2FLLaDALM._generate_block_single
    patch = patch_d2f(cls, alpha_scale=0.0)  # on, but inert residuals: same output
    assert cls(D2FLLaDADouble(), MASK)._generate_block_single(PROMPT) == plain


def test_flag_on_injects_in_every_block_in_flight_with_absolute_positions(monkeypatch):
    spy = SamplerIds().install(monkeypatch)
    model = D2FLLaDADouble()
    lm = D2FLLaDALM(PeftLike(model), MASK, confidence_threshold=0.999)
    patch = patch_d2f(lm)  # instance-level
    generated = lm._generate_block_single(PROMPT)
    assert len(generated) == 16 and MASK not in generated
    assert isinstance(lm.model, PeftLike)  # restored after the call
    embed = model.get_input_embeddings().weight
    assert check_injection(model.calls, spy.ids, embed, MASK, PROMPT.shape[1], None) > 0
    # several blocks were in flight in one call, and calls started after the cache
    assert any((ids == MASK).sum() > 4 for ids in spy.ids)
    assert any(int(call.positions[0, 0]) > 0 for call in model.calls)
    assert patch.last_rcd_model.stats.target_forwards == len(model.calls)
    patch.undo()
    assert "_generate_block_single" not in vars(lm)


def test_new_blocks_get_the_configured_init(monkeypatch):
    model = D2FLLaDADouble()
    lm = D2FLLaDALM(model, MASK, confidence_threshold=0.999)
    patch_d2f(lm, init="dirichlet", seed=0)
    lm._generate_block_single(PROMPT)
    mask_embed = model.get_input_embeddings().weight[MASK]
    # with a warm init no masked position is ever fed plain [M]
    first = model.calls[0]
    masked_rows = first.embeds[0, PROMPT.shape[1]:]
    assert not torch.isclose(masked_rows, mask_embed.expand_as(masked_rows)).all(-1).any()
