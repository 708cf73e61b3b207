"""One definition per option: the dataclasses of `rcd_ext.options` and what is generated from them
(the `rcd generate` flags, lm-eval's model_args, `generate(**flat)`, `wrap(**flat)`)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch
from test_decoding_doubles import tiny_model

from rcd_ext import options
from rcd_ext.commands import generate as generate_command
from rcd_ext.commands._usage import UsageError
from rcd_ext.decoding.generation import generate, lay_out_batch, resolve_options
from rcd_ext.integrations.lm_eval_args import (
    OPTION_KEYS,
    RUN_KEYS,
    CheckpointFacts,
    ModelArgsError,
    check_model_args,
)
from rcd_ext.integrations.sglang.config import RCDServingConfig
from rcd_ext.models.adapters import get_adapter
from rcd_ext.options import DecodingConfig, OptionError, ResidualConfig, option_names
from rcd_ext.seeding import seeded_generator
from rcd_ext.wrapper import wrap

# `rcd generate` flags in the decoding / residual groups that are not options of the decoding
# loop or the residual: run settings of the command
CLI_ONLY_FLAGS = {"--seed", "--mask-id"}
FACTS = CheckpointFacts(context=256)


def generate_parser() -> argparse.ArgumentParser:
    subparsers = argparse.ArgumentParser(prog="rcd").add_subparsers()
    return generate_command.add_parser(subparsers)


def option_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The positive flags (no --no-x) of the parser's decoding and residual groups."""
    flags = set()
    for group in parser._action_groups:
        if group.title in ("decoding", "residual"):
            for action in group._group_actions:
                flags.update(flag for flag in action.option_strings
                             if not flag.startswith("--no-"))
    return flags


def test_fields_flags_and_model_args_are_the_same_set():
    names = set(option_names(ResidualConfig, DecodingConfig))
    flags = option_flags(generate_parser()) - CLI_ONLY_FLAGS
    assert flags == {"--" + name.replace("_", "-") for name in names}
    assert set(OPTION_KEYS) == names and not OPTION_KEYS & RUN_KEYS
    for name in sorted(names):  # each option is accepted as a model_arg (its default, spelled)
        default = getattr(ResidualConfig(), name, None) if name in option_names(
            ResidualConfig) else getattr(DecodingConfig(), name)
        raw = {"pretrained": "org/model", "gen_length": 32, "block_length": 32,
               name: "none" if default is None else str(default)}
        check_model_args("rcd", raw, residuals_default=True, facts=FACTS)


def test_cli_has_dirichlet_concentration_and_both_bool_spellings():
    parser = generate_parser()
    args = parser.parse_args(["--model", "m", "--init", "dirichlet",
                              "--dirichlet-concentration", "0.5", "--no-stop-at-eos"])
    assert generate_command.residual_config(args).dirichlet_concentration == 0.5
    assert args.stop_at_eos is False
    assert parser.parse_args(["--model", "m"]).stop_at_eos is True
    assert parser.parse_args(["--model", "m", "--temper-delta"]).temper_delta is True


def test_generated_flags_refuse_out_of_bounds_values(capsys):
    parser = generate_parser()
    for argv, message in ((["--alpha-scale", "2"], "expected a number in [0, 1], got 2"),
                          (["--dirichlet-concentration", "0"], "expected a number > 0, got 0"),
                          (["--strategy", "max"], "invalid choice: 'max'"),
                          (["--top-k", "x"], "expected an integer >= 0, got 'x'")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", *argv])
        assert message in capsys.readouterr().err


def test_add_arguments_takes_type_default_and_bool_spelling_from_the_fields():
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, DecodingConfig)
    args = parser.parse_args(["--gen-length", "16", "--block-length", "8", "--no-stop-at-eos",
                              "--cache", "dual"])
    assert DecodingConfig(**vars(args)) == DecodingConfig(gen_length=16, block_length=8,
                                                          stop_at_eos=False, cache="dual")
    assert DecodingConfig(**vars(parser.parse_args([]))) == DecodingConfig()


# ---- the gen_length / block_length / steps rules: one copy, three spellings ----------------------
STEPS_ABOVE = ("each step unmasks at least one token, so at most 8 steps run")


def test_steps_above_gen_length_is_refused_alike_everywhere():
    with pytest.raises(OptionError) as python:
        DecodingConfig(gen_length=8, block_length=4, steps=100)
    assert str(python.value) == ("steps=100 exceeds gen_length=8: " + STEPS_ABOVE
                                 + " (use steps=8 or fewer)")
    with pytest.raises(ValueError, match="steps=100 exceeds gen_length=8"):
        generate(object(), [[5, 6]], gen_length=8, block_length=4, steps=100)  # before any use
    with pytest.raises(OptionError) as cli:
        options.check_lengths(8, 4, 100, options.CLI)
    assert str(cli.value) == ("--steps 100 > --gen-length 8: " + STEPS_ABOVE
                              + " (use --steps 8 or fewer)")
    with pytest.raises(ModelArgsError) as lm_eval:
        check_model_args("rcd", {"pretrained": "m", "gen_length": 8, "block_length": 4,
                                 "steps": 100}, residuals_default=True, facts=FACTS)
    assert str(lm_eval.value) == "rcd model_args: " + str(python.value)


@pytest.mark.parametrize("lengths, field", [((10, 4, None), "gen_length"),
                                            ((8, 4, 3), "steps"), ((8, 4, 9), "steps")])
def test_length_rules_name_the_option(lengths, field):
    with pytest.raises(OptionError) as caught:
        options.check_lengths(*lengths)
    assert caught.value.name == field and str(caught.value).startswith(f"{field}=")
    options.check_lengths(8, 4, 4)
    options.check_lengths(8, 4, None)


def test_gen_length_none_is_only_refused_where_a_number_is_needed():
    later = DecodingConfig(gen_length=None, steps=100)  # lm-eval: decided per request
    with pytest.raises(OptionError, match="gen_length is None"):
        later.require_gen_length()
    assert replace(later, gen_length=128, block_length=32).steps_per_block == 25


# ---- generate / wrap: configs or flat keywords ---------------------------------------------------
def test_flat_keywords_build_the_same_configs():
    residual, decoding = resolve_options(None, None, {"gen_length": 8, "block_length": 4,
                                                      "t_res": 0.5, "init": "dirichlet"})
    assert residual == ResidualConfig(t_res=0.5, init="dirichlet")
    assert decoding == DecodingConfig(gen_length=8, block_length=4)
    assert resolve_options(None, None, {}) == (ResidualConfig(), DecodingConfig())


def test_a_config_and_flat_options_of_it_together_are_refused():
    with pytest.raises(ValueError, match="t_res given both as keyword and through residual="):
        resolve_options(ResidualConfig(), None, {"t_res": 0.5})
    with pytest.raises(ValueError, match="steps given both as keyword and through decoding="):
        resolve_options(None, DecodingConfig(), {"steps": 4})
    with pytest.raises(TypeError, match="unexpected keyword argument 'gen_lenght'"):
        resolve_options(None, None, {"gen_lenght": 8})
    # a config of one concern and flat options of the other mix
    residual, decoding = resolve_options(ResidualConfig(t_res=0.5), None, {"gen_length": 8,
                                                                          "block_length": 8})
    assert residual.t_res == 0.5 and decoding.gen_length == 8


def test_generate_with_configs_equals_generate_with_flat_keywords():
    model, prompt = tiny_model(), torch.tensor([[5, 6, 7], [8, 9, 10]])
    flat = generate(model, prompt, gen_length=8, block_length=4, steps=8, temperature=1.0,
                    t_res=0.7, init="dirichlet", stop_at_eos=False, seed=3)
    configs = generate(model, prompt, seed=3,
                       residual=ResidualConfig(t_res=0.7, init="dirichlet"),
                       decoding=DecodingConfig(gen_length=8, block_length=4, steps=8,
                                               temperature=1.0, stop_at_eos=False))
    assert torch.equal(flat.sequences, configs.sequences)


def test_wrap_takes_a_residual_config_or_flat_keywords():
    model = tiny_model()
    config = ResidualConfig(t_res=0.5, scope="all")
    assert wrap(model, residual=config).config == wrap(model, t_res=0.5, scope="all").config
    with pytest.raises(ValueError, match="given both"):
        wrap(model, residual=config, t_res=0.5)


def test_lay_out_batch_left_pads_by_the_layout():
    model = tiny_model()
    adapter = get_adapter(model, None)
    batch = lay_out_batch([[5, 6], [7, 8, 9]], adapter, DecodingConfig(gen_length=4,
                                                                       block_length=4),
                          pad_id=None, device=torch.device("cpu"))
    pad, mask = adapter.pad_id, adapter.mask_id
    assert batch.x.tolist() == [[pad, 5, 6] + [mask] * 4, [7, 8, 9] + [mask] * 4]
    assert batch.loop_start == 3 and batch.fill == pad and batch.padding is not None


def test_seeding_streams():
    assert seeded_generator(None) is None
    first = torch.rand(3, generator=seeded_generator(3, stream=1))
    assert torch.equal(first, torch.rand(3, generator=torch.Generator().manual_seed(4)))


# ---- the CLI and the serving config go through the dataclasses ---------------------------------
def test_cli_residual_values_refused_by_the_dataclass_are_one_line():
    args = generate_parser().parse_args(["--model", "m", "--residual-top-k", "4"])
    assert generate_command.residual_config(args).residual_top_k == 4
    args.t_res = 1e-39
    with pytest.raises(UsageError, match="t_res must be a finite number"):
        generate_command.residual_config(args)


def test_serving_config_checks_t_res_by_the_ops_rule_and_builds_a_residual_config():
    with pytest.raises(ValueError, match=r"1 / t_res"):
        RCDServingConfig.from_mapping({"t_res": 1e-39})
    config = RCDServingConfig.from_mapping({"t_res": 0.5, "init": "dirichlet"})
    assert config.residual() == ResidualConfig(t_res=0.5, init="dirichlet")


def test_rcd_train_objective_flags_are_the_diffusion_arguments_fields():
    from rcd_ext.commands import train as train_command

    subparsers = argparse.ArgumentParser().add_subparsers()
    parser = train_command.add_parser(subparsers)
    group = next(g for g in parser._action_groups if g.title.startswith("objective"))
    flags = {flag for action in group._group_actions for flag in action.option_strings}
    names = option_names(options.DiffusionArguments)
    assert flags == {"--" + name.replace("_", "-") for name in names}
    args = parser.parse_args(["--stage", "rcd", "--data", "task:pointer_chasing",
                              "--output-dir", "o", "--residual-source", "unroll",
                              "--unroll-steps", "6", "--unroll-fraction", "0.5"])
    built = options.DiffusionArguments(**options.values_of(args, options.DiffusionArguments))
    assert (built.residual_source, built.unroll_steps, built.unroll_fraction) == (
        "unroll", 6, 0.5)
    assert built.unroll_init == options.DiffusionArguments().unroll_init  # the one default
