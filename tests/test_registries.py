"""The extension registries: the generic `Registry`, and one new alpha strategy, init strategy and
model family each registered from a test, run end to end and compared against plainly written
expectations, then unregistered."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_decoding_doubles import tiny_model
from torch import nn

from rcd_ext import ops
from rcd_ext.alpha_strategies import (
    ALPHA_STRATEGIES,
    STRATEGIES,
    AlphaStrategy,
    register_alpha_strategy,
)
from rcd_ext.decoding.generation import generate
from rcd_ext.init_strategies import (
    INIT_STRATEGIES,
    INIT_STRATEGY_REGISTRY,
    InitStrategy,
    register_init_strategy,
)
from rcd_ext.models.adapters import (
    FAMILIES,
    ModelAdapter,
    ModelFamily,
    family_of,
    get_adapter,
    register_family,
)
from rcd_ext.options import ResidualConfig
from rcd_ext.registry import Registry
from rcd_ext.wrapper import wrap

CSRC = Path(__file__).resolve().parents[1] / "csrc"


# ---- the generic registry ---------------------------------------------------------------------

def test_registry_registers_by_call_and_decorator_and_lists_in_order():
    registry: Registry[object] = Registry("widget")
    first = registry.register("first", 1)

    @registry.register("second")
    def second():
        return 2

    assert first == 1 and registry.get("second") is second
    assert registry.names() == ("first", "second")
    view = registry.view()
    registry.register("third", 3)
    assert list(view) == ["first", "second", "third"] and "third" in view and view[-1] == "third"
    assert repr(view) == "('first', 'second', 'third')" and len(view) == 3
    assert registry.unregister("third") == 3 and "third" not in view


def test_registry_refuses_unknown_names_and_a_second_value_for_a_name():
    registry: Registry[int] = Registry("widget")
    registry.register("a", 1)
    registry.register("a", 1)  # the same value again is fine (module re-imports)
    with pytest.raises(ValueError, match=r"^unknown widget 'b'; known: a$"):
        registry.get("b")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a", 2)
    with pytest.raises(ValueError, match="non-empty string"):
        registry.register("", 3)
    with pytest.raises(ValueError, match="unknown widget"):
        registry.unregister("b")


def test_tasks_use_the_registry():
    from rcd_ext.tasks import get_task, task_names

    assert task_names() == sorted(task_names()) and "pointer_chasing" in task_names()
    with pytest.raises(ValueError, match=r"unknown task 'bogus'; known: .*pointer_chasing"):
        get_task("bogus")


# ---- alpha strategies -------------------------------------------------------------------------

def _header_strategy_codes() -> dict[str, int]:
    """name -> code as the C++ sources define them: the enum in residual_codes.h and the names
    parse_strategy maps onto it in residual_context.h."""
    enum = re.search(r"enum class Strategy : int32_t \{([^}]*)\}",
                     (CSRC / "residual_codes.h").read_text()).group(1)
    codes = {k: int(v) for k, v in re.findall(r"(k\w+) = (\d+)", enum)}
    parse = (CSRC / "residual_context.h").read_text()
    names = re.findall(r'if \(name == "(\w+)"\) return Strategy::(k\w+);', parse)
    return {name: codes[enumerator] for name, enumerator in names}


def test_python_kernel_codes_match_the_cpp_header():
    fused = {name: s.kernel_code for name, s in ALPHA_STRATEGIES.items()
             if s.kernel_code is not None}
    assert fused == _header_strategy_codes() == {"entropy": 0, "confidence": 1, "fixed": 2}
    count = re.search(r"kStrategyCount = (\d+);", (CSRC / "residual_codes.h").read_text())
    assert int(count.group(1)) == len(fused)


def test_cuda_sources_copy_no_strategy_constants():
    for path in (CSRC / "cuda").iterdir():
        text = path.read_text()
        assert "kStrategyEntropy" not in text and "kStrategyConfidence" not in text, path
        assert not re.search(r"constexpr int32_t kRow\w+ =", text), path


@pytest.fixture
def squared_strategy():
    """alpha = alpha_scale * h^2 (h the normalized entropy), reference only (no kernel)."""
    strategy = register_alpha_strategy(
        AlphaStrategy("squared", lambda h, scale: scale * h * h))
    yield strategy
    ALPHA_STRATEGIES.unregister("squared")


def _plain_squared_residual(logits, table, mask, t_res, scale):
    """The residual with alpha = scale * (H / log V)^2, written out in float64."""
    z = logits.double()
    q = torch.softmax(z / t_res, -1)
    entropy = -(q * q.log()).sum(-1)
    alpha = scale * (entropy / math.log(z.shape[1])) ** 2
    delta = torch.softmax(z, -1) @ table.double()
    return (1 - alpha)[:, None] * mask.double() + alpha[:, None] * delta, alpha


def test_a_registered_alpha_strategy_runs_the_op_exact_and_top_k(squared_strategy):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=generator) * 3
    table = torch.randn(40, 8, generator=generator)
    embeds, alpha = ops.residual_context(logits, table, table[1], t_res=0.8,
                                         strategy="squared", alpha_scale=0.7)
    want_embeds, want_alpha = _plain_squared_residual(logits, table, table[1], 0.8, 0.7)
    torch.testing.assert_close(alpha.double(), want_alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeds.double(), want_embeds, rtol=1e-5, atol=1e-5)
    # the sparse path takes alpha from the same registry entry
    _, top_k_alpha = ops.residual_context(logits, table, table[1], t_res=0.8,
                                          strategy="squared", alpha_scale=0.7, residual_top_k=5)
    torch.testing.assert_close(top_k_alpha.double(), want_alpha, rtol=1e-5, atol=1e-6)
    assert "squared" in STRATEGIES and "squared" in ops.STRATEGIES
    assert ResidualConfig(strategy="squared").strategy == "squared"


def test_a_strategy_without_a_kernel_is_refused_by_the_compiled_op(squared_strategy):
    if not ops._extension.cpu_loaded:
        pytest.skip("the compiled CPU op is not built")
    logits, table = torch.randn(2, 8), torch.randn(8, 4)
    with pytest.raises(ValueError, match="strategy 'squared' has no fused kernel"):
        torch.ops.rcd_ext.residual_context(logits, table, table[0], 1.0, False, "squared", 1.0)


def test_a_registered_alpha_strategy_decodes_like_its_builtin_equivalent():
    # alpha = 0.5 * h through the reference path == "entropy" with alpha_scale 0.5 (fused)
    register_alpha_strategy(AlphaStrategy("half_entropy", lambda h, scale: 0.5 * scale * h))
    try:
        model = tiny_model()
        prompt = torch.randint(5, 16, (2, 3), generator=torch.Generator().manual_seed(0))
        kwargs = dict(gen_length=8, block_length=4, steps=4, stop_at_eos=False, trace=True)
        ours = generate(model, prompt, strategy="half_entropy", **kwargs)
        builtin = generate(model, prompt, strategy="entropy", alpha_scale=0.5, **kwargs)
        assert torch.equal(ours.sequences, builtin.sequences)
        for mine, theirs in zip(ours.trace, builtin.trace, strict=True):
            torch.testing.assert_close(mine.alpha, theirs.alpha, rtol=1e-5, atol=1e-6)
        assert any(bool((step.alpha > 0).any()) for step in ours.trace)
    finally:
        ALPHA_STRATEGIES.unregister("half_entropy")
    with pytest.raises(ValueError, match="strategy must be one of"):
        ResidualConfig(strategy="half_entropy")


def test_unknown_strategies_are_refused_everywhere():
    logits, table = torch.randn(2, 8), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"strategy must be one of \('entropy', 'confidence', "
                                         r"'fixed'\), got 'bogus'"):
        ops.residual_context(logits, table, table[0], strategy="bogus")
    with pytest.raises(ValueError, match="unknown alpha strategy 'bogus'; known: entropy, "):
        ops.residual_context_reference(logits, table, table[0], strategy="bogus")
    with pytest.raises(ValueError, match="strategy must be one of"):
        ResidualConfig(strategy="bogus")


# ---- init strategies --------------------------------------------------------------------------

class _EmbedsRecorder:
    """Forward pre-hook keeping the inputs_embeds of every call."""

    def __init__(self, model: nn.Module):
        self.calls: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(kwargs["inputs_embeds"].detach().clone())


def test_a_registered_init_strategy_primes_masked_positions():
    # uniform logits: H = log V, so alpha = alpha_scale and the residual is the mean row of E
    register_init_strategy(InitStrategy(
        "uniform", lambda wrapper, call: torch.zeros(call.rows.numel(),
                                                     wrapper.adapter.vocab_size)))
    try:
        assert "uniform" in INIT_STRATEGIES
        model = tiny_model()
        table = model.get_input_embeddings().weight.detach()
        recorder = _EmbedsRecorder(model)
        rcd_model = wrap(model, init="uniform", alpha_scale=0.6, scope="all")
        ids = torch.tensor([[5, 6, 1, 1, 7, 1]])
        rcd_model(ids)
        recorder.handle.remove()
        (embeds,) = recorder.calls
        masked = ids[0] == 1
        expected_residual = 0.4 * table[1] + 0.6 * table.mean(0)
        torch.testing.assert_close(embeds[0, masked],
                                   expected_residual.expand(int(masked.sum()), -1),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(embeds[0, ~masked], table[ids[0, ~masked]])
    finally:
        INIT_STRATEGY_REGISTRY.unregister("uniform")
    assert "uniform" not in INIT_STRATEGIES
    with pytest.raises(ValueError, match="init must be one of"):
        ResidualConfig(init="uniform")


def test_a_registered_init_strategy_needing_a_reference_requires_one():
    register_init_strategy(InitStrategy("needs_ref", lambda wrapper, call: None,
                                        needs_reference=True))
    try:
        with pytest.raises(ValueError, match="init='needs_ref' needs ref_model"):
            wrap(tiny_model(), init="needs_ref")
    finally:
        INIT_STRATEGY_REGISTRY.unregister("needs_ref")


# ---- model families ---------------------------------------------------------------------------

class ToyDLLM(nn.Module):
    """A model of an unknown family ("toy-dllm"): the tiny dLLM's weights behind a plain
    forward(input_ids, inputs_embeds) and a config without a mask id."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()
        self.config = SimpleNamespace(model_type="Toy-DLLM", vocab_size=16,
                                      max_position_embeddings=64, eos_token_id=2,
                                      pad_token_id=0)

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None):
        return self.inner(input_ids=input_ids, inputs_embeds=inputs_embeds)


class ToyAdapter(ModelAdapter):
    no_padding_reason = "toy models are never padded"

    @classmethod
    def family_options(cls, model, tokenizer, mask_id):
        return {}, 1 if mask_id is None else mask_id  # the family's mask id: 1


@pytest.fixture
def toy_family():
    family = register_family(ModelFamily("toy", lambda model_type: model_type == "toy-dllm",
                                         ToyAdapter))
    yield family
    FAMILIES.unregister("toy")


def test_a_registered_family_is_detected_and_builds_its_adapter(toy_family):
    toy = ToyDLLM()
    adapter = get_adapter(toy)
    assert family_of(toy) == "toy" and type(adapter) is ToyAdapter
    assert (adapter.family, adapter.mask_id, adapter.eos_id) == ("toy", 1, 2)
    with pytest.raises(ValueError, match="Toy-DLLM does not support prompts of different "
                                         "lengths.*; toy models are never padded"):
        adapter.check_padding()


def test_a_registered_family_decodes_like_the_model_it_wraps(toy_family):
    toy = ToyDLLM()
    prompt = torch.randint(5, 16, (2, 3), generator=torch.Generator().manual_seed(1))
    kwargs = dict(gen_length=8, block_length=4, steps=4, stop_at_eos=False)
    ours = generate(toy, prompt, **kwargs)
    tiny = generate(toy.inner, prompt, cache="none", **kwargs)
    assert torch.equal(ours.sequences, tiny.sequences)
    assert ours.stats.forward_passes == tiny.stats.forward_passes == 4  # no cache: one a step
    with pytest.raises(ValueError, match="toy models are never padded"):
        generate(toy, [[5, 6, 7], [5, 6]], **kwargs)


def test_an_unregistered_family_is_generic():
    toy = ToyDLLM()
    assert family_of(toy) == "generic"
    with pytest.raises(ValueError, match="no mask token id"):
        get_adapter(toy)
