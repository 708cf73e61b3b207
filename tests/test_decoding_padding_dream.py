"""Left padding for Dream: the kwargs every forward receives (default suite).

`DreamDouble` ignores `attention_mask` and `position_ids` (one attention layer over arange
positions), so it cannot show that a padded batch decodes each row as alone; that is shown on
Dream's real modelling code by `tests/test_integration_real_dream_padding.py` (needs
RCD_FAST_DLLM_PATH). Here the double only records its calls: every forward of a padded batch
gets the 4-D bool mask Dream's SDPA attention takes ([B, 1, L, C+L], padding masked as keys,
a padded query attending to itself only, so no query row is empty) and per-row positions; a
batch of one prompt length gets neither.
"""

from __future__ import annotations

import pytest
import torch
from test_decoding_doubles import DREAM_MASK, DreamDouble

from rcd_ext.decoding.generation import batch_layout, generate
from rcd_ext.models.adapters import LeftPadding, get_adapter

PAD = 0
COMMON = dict(gen_length=8, block_length=4, steps=4, pad_id=PAD)


def expected_mask(offsets: list[int], keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[B, 1, l, k]: a real query sees the real keys; a padded query only itself."""
    start = torch.tensor(offsets)[:, None]
    real_keys, real_queries = keys[None, :] >= start, queries[None, :] >= start
    own = queries[:, None] == keys[None, :]  # [l, k]
    return ((real_queries[:, :, None] & real_keys[:, None, :]) | own[None]).unsqueeze(1)


def test_the_mask_is_dreams_4d_bool_mask_with_padded_queries_on_themselves():
    padding = LeftPadding.from_offsets([3, 0, 1], 7)
    adapter = get_adapter(DreamDouble()).with_padding(padding)
    assert adapter.supports_padding and adapter.shift_logits
    kwargs = adapter.full_forward_kwargs("none")
    mask = kwargs["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 7, 7)
    columns = torch.arange(7)
    assert torch.equal(mask, expected_mask([3, 0, 1], columns, columns))
    # real queries see exactly the real keys; a padded query only itself
    assert torch.equal(mask[0, 0, 5], torch.tensor([False] * 3 + [True] * 4))
    assert torch.equal(mask[0, 0, 1], torch.eye(7, dtype=torch.bool)[1])
    assert bool(mask.any(-1).all())
    assert torch.equal(kwargs["position_ids"], columns[None].expand(3, -1))
    # the reference warm start: a forward of columns 0..4
    short = adapter.uncached_kwargs(5, 4, torch.device("cpu"))["attention_mask"]
    assert torch.equal(short, expected_mask([3, 0, 1], columns[:5], columns[:5]))


def test_the_shift_reads_each_rows_last_prompt_token():
    """Semi-AR rows are left-padded to the longest prompt P: every row's last prompt token is
    at column P - 1, so the shifted logits of the first generated column P are that token's."""
    layout = batch_layout([3, 5, 8], 8, 4, block_diffusion=False)
    assert layout.gen_starts == [8, 8, 8]
    assert [o + n - 1 for o, n in zip(layout.offsets, [3, 5, 8], strict=True)] == [7, 7, 7]
    adapter = get_adapter(DreamDouble())
    raw = torch.randn(3, layout.total, 5)
    shifted = adapter.logits(type("Out", (), {"logits": raw})())
    assert torch.equal(shifted[:, 8], raw[:, 7])


class CallSpy:
    def __init__(self, model):
        self.calls: list[dict] = []
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append(dict(kwargs))


@pytest.mark.parametrize("rcd, init", [(False, "cold"), (True, "cold"), (True, "self"),
                                       (True, "reference")])
def test_every_forward_of_a_padded_dream_batch_is_masked(rcd, init):
    model, reference = DreamDouble(), DreamDouble(seed=1)
    spies = [CallSpy(model), CallSpy(reference)]
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 100, (n,), generator=generator).tolist() for n in (3, 5, 8)]
    offsets = [5, 3, 0]
    result = generate(model, rows, rcd=rcd, init=init,
                      ref_model=reference if init == "reference" else None, **COMMON)
    assert result.tokens.shape == (3, 8) and not (result.tokens == DREAM_MASK).any()
    calls = spies[0].calls + spies[1].calls
    assert calls and bool(spies[1].calls) == (init == "reference")
    for call in calls:
        embeds = call.get("inputs_embeds")
        length = (call["input_ids"] if embeds is None else embeds).shape[1]
        columns = torch.arange(length)  # full forwards only: columns 0..length-1
        assert torch.equal(call["attention_mask"], expected_mask(offsets, columns, columns))
        positions = (columns[None] - torch.tensor(offsets)[:, None]).clamp_min(0)
        assert torch.equal(call["position_ids"], positions)  # each row's own positions


def test_equal_lengths_pass_no_mask_to_dream():
    model = DreamDouble()
    spy = CallSpy(model)
    generate(model, [[5, 6, 7], [8, 9, 10]], init="self", **COMMON)
    assert spy.calls
    assert all(call.get("attention_mask") is None and call.get("position_ids") is None
               for call in spy.calls)
