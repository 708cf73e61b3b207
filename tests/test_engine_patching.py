"""The options every patched sampler takes (flat keywords routed into one ResidualConfig), and
the patching toolkit every engine adapter uses (patch an attribute, keep it, restore exactly)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from rcd_ext.embedding_rewrite import EmbeddingRewrite
from rcd_ext.integrations.engine_patching import (
    OPTION_NAMES,
    RCDOptions,
    SamplerPatch,
    patch_attribute,
    split_options,
    swapped_forward,
    unpatched,
)
from rcd_ext.integrations.runner_patch import RunnerPatch
from rcd_ext.residual import ResidualConfig


def test_flat_residual_keywords_land_in_the_residual_config():
    options = RCDOptions().updated({"t_res": 0.92, "init": "dirichlet", "suffix": "residual",
                                    "strategy": None})
    assert options.residual == ResidualConfig(t_res=0.92, init="dirichlet")
    assert options.residual_config() == ResidualConfig(t_res=0.92, init="dirichlet", scope="all")
    assert options.residual_config("block").scope == "block"
    assert RCDOptions().residual_config().scope == "block"  # suffix "mask" by default
    # None keeps the current value; the original is unchanged (frozen copies)
    assert options.updated({"t_res": None}).residual.t_res == 0.92
    assert RCDOptions().residual.t_res == 1.0


def test_bad_options_are_refused_with_the_value_and_what_was_expected():
    with pytest.raises(TypeError, match=r"unknown RCD option\(s\) \['temperature_res'\]"):
        RCDOptions().updated({"temperature_res": 0.9})
    with pytest.raises(ValueError, match="t_res must be a finite number >= "):
        RCDOptions().updated({"t_res": 0.0})
    with pytest.raises(ValueError, match="suffix must be one of"):
        RCDOptions().updated({"suffix": "stale"})
    with pytest.raises(TypeError, match="unknown"):
        RCDOptions().updated({"scope": "all"})  # scope is the suffix option's business


def test_split_options_separates_rcd_keywords_from_the_samplers_own():
    assert "residual" not in OPTION_NAMES and "t_res" in OPTION_NAMES
    options, rest = split_options({"t_res": 0.5, "rcd": False, "threshold": 0.9,
                                   "steps": 64})
    assert options == {"t_res": 0.5, "rcd": False}
    assert rest == {"threshold": 0.9, "steps": 64}


# ---- the patching toolkit: patch an attribute, keep the original, restore exactly ----------


def engine_method(self):
    return "engine"


class Base:
    sample = engine_method


class Child(Base):
    pass


def rcd_function(original):
    """A stand-in for an adapter's wrapper: marked with the function it wraps."""

    def wrapper(*args, **kwargs):
        return ("rcd", original(*args, **kwargs))

    wrapper.__rcd_original__ = original
    return wrapper


def test_a_class_attribute_is_restored_as_the_same_object():
    cls = type("Engine", (), {"sample": engine_method})
    before = dict(vars(cls))
    patch = patch_attribute(cls, "sample", rcd_function(engine_method))
    assert cls().sample() == ("rcd", "engine")
    patch.restore()
    assert vars(cls)["sample"] is engine_method and dict(vars(cls)) == before


def test_an_inherited_class_attribute_is_deleted_again_not_copied():
    cls = type("Engine", (Base,), {})
    patch = patch_attribute(cls, "sample", rcd_function(engine_method))
    assert "sample" in vars(cls)
    patch.restore()
    assert "sample" not in vars(cls) and cls.sample is engine_method


def test_an_instance_attribute_is_restored_or_removed_exactly():
    absent, present = Child(), Child()
    own = types.MethodType(engine_method, present)
    present.sample = own
    for obj in (absent, present):
        before = dict(vars(obj))
        patch = patch_attribute(obj, "sample", types.MethodType(rcd_function(engine_method), obj))
        assert obj.sample() == ("rcd", "engine")
        patch.restore()
        assert dict(vars(obj)) == before
    assert "sample" not in vars(absent) and vars(present)["sample"] is own


def test_a_module_attribute_is_restored():
    module = types.ModuleType("generate_double")
    module.generate = engine_method
    patch = patch_attribute(module, "generate", rcd_function(engine_method))
    patch.restore()
    assert module.generate is engine_method


def test_two_plain_patches_restore_in_reverse_order():
    cls = type("Engine", (), {"sample": engine_method})
    first, second = (lambda self: 1), (lambda self: 2)
    outer = patch_attribute(cls, "sample", first)
    inner = patch_attribute(cls, "sample", second)
    inner.restore()
    assert vars(cls)["sample"] is first
    outer.restore()
    assert vars(cls)["sample"] is engine_method


def test_patching_over_an_rcd_patch_restores_the_unpatched_engine():
    cls = type("Engine", (Base,), {})
    patch_attribute(cls, "sample", rcd_function(engine_method), over_patches=True)
    again = patch_attribute(cls, "sample", rcd_function(engine_method), over_patches=True)
    again.restore()  # re-patching replaced the first patch: back to the unpatched class
    assert "sample" not in vars(cls)
    # without over_patches the earlier patch is what comes back
    first = rcd_function(engine_method)
    patch_attribute(cls, "sample", first)
    patch_attribute(cls, "sample", rcd_function(engine_method)).restore()
    assert vars(cls)["sample"] is first


def test_restoring_or_undoing_twice_changes_nothing_the_second_time():
    cls = type("Engine", (), {"sample": engine_method})
    patch = SamplerPatch(options=None)
    patch.replace(cls, "sample", rcd_function(engine_method), engine_method)
    assert patch.originals == {"sample": engine_method}
    patch.undo()
    later = rcd_function(engine_method)
    cls.sample = later  # someone patches again after the undo
    patch.undo()
    assert vars(cls)["sample"] is later
    single = patch_attribute(cls, "sample", engine_method)
    single.restore()
    cls.sample = engine_method
    single.restore()
    assert vars(cls)["sample"] is engine_method


def test_submodules_parameters_and_buffers_are_refused():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="submodule, parameter or buffer"):
        patch_attribute(model, "0", nn.Identity())
    with pytest.raises(TypeError, match="submodule, parameter or buffer"):
        patch_attribute(model[0], "weight", nn.Parameter(torch.zeros(2, 2)))


def test_unpatched_sees_through_bound_methods_and_rcd_wrappers():
    obj = Child()
    assert unpatched(obj.sample) is engine_method
    assert unpatched(types.MethodType(rcd_function(engine_method), obj)) is engine_method
    assert unpatched(engine_method) is engine_method


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def test_swapped_forward_routes_calls_and_reenters_the_original():
    model = Doubler()
    seen = []

    def through(x):
        seen.append(x)
        return model(x) + 1  # re-entered: the original forward

    with swapped_forward(model, through):
        assert model(torch.tensor(3)) == 7 and model.forward(torch.tensor(1)) == 3
    assert [int(x) for x in seen] == [3, 1]
    assert "forward" not in vars(model) and model(torch.tensor(3)) == 6
    own = model.forward
    model.forward = own  # an instance forward (e.g. accelerate's) comes back as itself
    with pytest.raises(RuntimeError), swapped_forward(model, through):
        raise RuntimeError("the sampler failed")
    assert vars(model)["forward"] is own


class Runner:
    def __init__(self):
        self.model = nn.Embedding(8, 4)

    def run(self, seqs):
        return self.run_model(torch.tensor(seqs))

    def run_model(self, ids):
        return self.model(ids)


def test_runner_patch_wraps_instance_methods_and_undo_leaves_the_runner_as_it_was():
    runner = Runner()
    before = dict(vars(runner))
    patch = RunnerPatch(options=RCDOptions(), runner=runner, mask_id=7)
    hook = patch.attach(runner.model)
    calls = []
    patch.wrap("run", lambda original, seqs: calls.append(seqs) or original(seqs))
    assert patch.hook is hook and patch.originals["run"].__func__ is Runner.run
    runner.run([1, 2])
    assert calls == [[1, 2]] and runner.run.__rcd_original__ == patch.originals["run"]
    patch.undo()
    patch.undo()
    assert dict(vars(runner)) == before and not runner.model._forward_hooks


def test_embedding_rewrite_changes_only_announced_forwards():
    embedding = nn.Embedding(8, 4)
    ids = torch.tensor([[1, 2]])
    plain = embedding(ids)

    def rewrite(pending, inputs, output):
        assert torch.equal(inputs[0], ids)
        return output + pending

    hook = EmbeddingRewrite(embedding, rewrite)
    assert torch.equal(embedding(ids), plain)  # nothing announced
    hook.announce(1.0)
    assert torch.equal(embedding(ids), plain + 1.0)
    hook.cancel()
    assert torch.equal(embedding(ids), plain)
    hook.announce(1.0)
    hook.remove()
    hook.remove()
    assert torch.equal(embedding(ids), plain)
