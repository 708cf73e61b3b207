"""Optional: left padding on Dream's real modelling code (CPU, about a minute).

Run with a Fast-dLLM checkout holding `dream/` and/or `v1/dream/` (skipped otherwise):
    RCD_FAST_DLLM_PATH=/path/to/Fast-dLLM  pytest tests/test_integration_real_dream_padding.py

A 2-layer random-weight Dream of the checkout's own `model/modeling_dream.py` (as in
`test_integration_real_engines.py`) decodes a batch of prompts of 3, 5 and 8 tokens with
`rcd_ext.generate`, greedy, RCD off and on (cold, self and reference init; the reference is a
second such Dream), fixed and threshold remasking: every row must decode to exactly the tokens
of its prompt alone, and no logits row of any forward (padded rows included) may hold a NaN.
Checked around it: the 4-D mask every forward receives, and one padded forward against the
rows alone (logits equal up to float rounding: Fast-dLLM's forward rebuilds arange position
ids, so a padded row runs at shifted positions, which RoPE's relative scores leave unchanged
in exact arithmetic).
"""

from __future__ import annotations

import pytest
import torch

from rcd_ext.decoding.generation import batch_layout, generate
from rcd_ext.models.adapters import LeftPaddedModel, LeftPadding, get_adapter
from tests.engine_doubles.real_checkout import engine_imports
from tests.test_integration_real_engines import FAST_DLLM, fast_dllm_dream_layouts

DREAM_MASK, DREAM_PAD = 151666, 151643
LENGTHS = (3, 5, 8)
COMMON = dict(gen_length=8, block_length=4, steps=4, threshold=0.5, temperature=0.0)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not fast_dllm_dream_layouts(), reason="set RCD_FAST_DLLM_PATH to a "
                       "Fast-dLLM checkout with dream/ or v1/dream/"),
]


@pytest.fixture(scope="module", params=fast_dllm_dream_layouts(),
                ids=lambda p: p.relative_to(FAST_DLLM).as_posix() if FAST_DLLM else str(p))
def dreams(request):
    """Two of the checkout's DreamModel (seeds 0 and 1: target and reference), 2 layers,
    Dream-7B's vocabulary and special ids (the configuration of
    `test_fast_dllm_dream_block_sampler`), random weights, SDPA attention."""
    with engine_imports(request.param):
        from model.configuration_dream import DreamConfig
        from model.modeling_dream import DreamModel

        config = DreamConfig(vocab_size=151680, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, mask_token_id=DREAM_MASK,
                             pad_token_id=DREAM_PAD, bos_token_id=DREAM_PAD,
                             eos_token_id=DREAM_PAD)
        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(DreamModel(config).eval())
        return models


@pytest.fixture
def dream(dreams):
    return dreams[0]


class LogitsSpy:
    """Every forward's kwargs and logits (hooks see the calls of the RCD wrapper too)."""

    def __init__(self, model):
        self.kwargs: list[dict] = []
        self.logits: list[torch.Tensor] = []
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after)]

    def _before(self, module, args, kwargs):
        self.kwargs.append(dict(kwargs))

    def _after(self, module, args, output):
        self.logits.append(output.logits.detach())

    def remove(self):
        for handle in self.handles:
            handle.remove()


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 1000, (n,), generator=generator).tolist() for n in LENGTHS]


@pytest.mark.parametrize("remasking", ["fixed", "threshold"])
@pytest.mark.parametrize("rcd, init", [(False, "cold"), (True, "cold"), (True, "self"),
                                       (True, "reference")])
def test_a_mixed_batch_decodes_each_row_as_alone(dreams, rcd, init, remasking):
    dream, reference = dreams
    rows = prompts()
    kwargs = dict(COMMON, rcd=rcd, init=init, remasking=remasking,
                  ref_model=reference if init == "reference" else None)
    spies = [LogitsSpy(dream), LogitsSpy(reference)]
    try:
        together = generate(dream, rows, **kwargs)
    finally:
        for spy in spies:
            spy.remove()
    assert together.prompt_lengths == list(LENGTHS)
    outputs = [logits for spy in spies for logits in spy.logits]
    assert outputs and not any(bool(torch.isnan(logits).any()) for logits in outputs)
    assert bool(spies[1].logits) == (init == "reference")
    for call in [call for spy in spies for call in spy.kwargs]:
        # every forward is masked, and no query row is all-False
        mask = call["attention_mask"]
        assert mask.dtype == torch.bool and mask.shape[:2] == (len(rows), 1)
        assert bool(mask.any(-1).all())
    for index, row in enumerate(rows):
        alone = generate(dream, [row], **kwargs)
        assert torch.equal(together.tokens[index], alone.tokens[0]), (index, len(row))
        width = alone.sequences.shape[1]
        assert torch.equal(together.sequences[index, -width:], alone.sequences[0])


def test_the_padded_forward_matches_the_rows_alone(dream):
    """One full forward of the padded batch against each row alone: no NaN anywhere, real
    columns equal up to float rounding, and the shifted logits of the first generated column
    come from each row's last prompt token, at the same column P - 1 for every row."""
    rows = prompts()
    layout = batch_layout(list(LENGTHS), 8, 4, block_diffusion=False)
    total, longest = layout.total, max(LENGTHS)
    padding = LeftPadding.from_offsets(layout.offsets, total)
    adapter = get_adapter(dream).with_padding(padding)
    x = torch.full((len(rows), total), DREAM_MASK)
    for index, (row, offset) in enumerate(zip(rows, layout.offsets, strict=True)):
        x[index, :offset] = DREAM_PAD
        x[index, offset:offset + len(row)] = torch.tensor(row)
    with torch.no_grad():
        padded = LeftPaddedModel(dream, padding)(input_ids=x,
                                                 **adapter.full_forward_kwargs("none"))
        assert not bool(torch.isnan(padded.logits).any())
        shifted = adapter.logits(padded)
        for index, (row, offset) in enumerate(zip(rows, layout.offsets, strict=True)):
            alone = dream(input_ids=x[index:index + 1, offset:]).logits[0]
            torch.testing.assert_close(padded.logits[index, offset:], alone,
                                       rtol=1e-5, atol=1e-5)
            # the first generated column P is scored by the row's last prompt token, P - 1
            assert int(x[index, longest - 1]) == row[-1]
            assert torch.equal(shifted[index, longest], padded.logits[index, longest - 1])
            torch.testing.assert_close(shifted[index, longest], alone[len(row) - 1],
                                       rtol=1e-5, atol=1e-5)
