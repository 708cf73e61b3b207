"""Fast-dLLM v2 integration: `batch_sample` patched through the input-embedding hook, on a
from-scratch double whose forward takes token ids only."""

from __future__ import annotations

import pytest
import torch

from rcd_ext.integrations.fast_dllm_v2 import patch_fast_dllm_v2
from tests.engine_doubles.fast_dllm_v2 import V2Double
from tests.engine_doubles.oracle import check_injection, shift_own_first

MASK = 47
PROMPT = torch.tensor([[3, 9, 14, 2], [5, 1, 30, 8]])
SETTINGS = {"tokenizer": None, "block_size": 8, "max_new_tokens": 16, "small_block_size": 4,
            "min_len": 4, "seq_len": torch.tensor([4, 4]), "mask_id": MASK,
            "threshold": 0.999}


def model_class():
    return type("V2", (V2Double,), {"batch_sample": V2Double.__dict__["batch_sample"]})


@pytest.mark.parametrize("use_block_cache", [False, True])
def test_v2_flag_off_bit_identical_and_on_injects_through_the_hook(use_block_cache):
    cls = model_class()
    plain = cls().batch_sample(PROMPT.clone(), **SETTINGS, use_block_cache=use_block_cache)
    patch = patch_fast_dllm_v2(cls)
    off = cls().batch_sample(PROMPT.clone(), **SETTINGS, use_block_cache=use_block_cache,
                             rcd=False)
    assert torch.equal(off, plain)
    same = cls().batch_sample(PROMPT.clone(), **SETTINGS, use_block_cache=use_block_cache,
                              alpha_scale=0.0)
    assert torch.equal(same, plain)
    model = cls()
    model.batch_sample(PROMPT.clone(), **SETTINGS, use_block_cache=use_block_cache)
    assert "forward" not in vars(model)
    embed = model.get_input_embeddings().weight
    ids = [call.input_ids for call in model.calls]
    assert check_injection(model.calls, ids, embed, MASK, PROMPT.shape[1], None,
                           shift=shift_own_first) > 0
    patch.undo()
    assert cls.batch_sample is V2Double.__dict__["batch_sample"]
