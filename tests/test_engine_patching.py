"""The options every patched sampler takes: flat keywords routed into one ResidualConfig."""

from __future__ import annotations

import pytest

from rcd_ext.integrations.engine_patching import OPTION_NAMES, RCDOptions, split_options
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
