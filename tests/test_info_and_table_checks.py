"""`rcd info` checks what it claims to check; a NaN embedding table is refused where it is first
seen instead of turning every residual into NaN."""

from __future__ import annotations

import math

import pytest
import torch

from rcd_ext import _extension
from rcd_ext.cli import main
from rcd_ext.residual import ResidualConfig, ResidualState

SMALL = ["info", "--rows", "3", "--vocab", "50", "--dim", "8"]


def test_info_checks_the_compiled_kernel_against_the_reference(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    assert "cpu: cpu-kernel" in out
    assert "max |kernel - reference|" in out and out.rstrip().endswith("ok")


def test_info_without_a_kernel_says_nothing_was_checked_and_fails(capsys, monkeypatch):
    monkeypatch.setattr(_extension, "cpu_loaded", False)
    monkeypatch.setattr(_extension, "cpu_error", "ImportError: _C.so: undefined symbol")
    assert main(SMALL) == 1
    out = capsys.readouterr().out
    assert "cpu: reference" in out
    assert "cpu kernel did not load: ImportError" in out
    assert "no compiled kernel loaded, so none was checked" in out
    assert " ok" not in out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_residual_state_refuses_a_table_with_non_finite_rows(bad):
    table = torch.randn(10, 4)
    table[7, 2] = bad
    with pytest.raises(ValueError, match="input embedding table row 7 contains NaN or inf"):
        ResidualState(table, mask_id=9, config=ResidualConfig())


def test_an_unchanged_table_is_read_once_and_an_in_place_change_is_seen(monkeypatch):
    from rcd_ext import op_checks

    reads = []
    check = op_checks._check_finite
    monkeypatch.setattr(op_checks, "_check_finite",
                        lambda table, name: reads.append(table.shape) or check(table, name))
    table = torch.randn(10, 4)
    for _ in range(3):
        ResidualState(table, mask_id=9, config=ResidualConfig())
    assert len(reads) == 1
    table[3, 1] = math.nan  # in place: the version counter moves on
    with pytest.raises(ValueError, match="input embedding table row 3 contains NaN or inf"):
        ResidualState(table, mask_id=9, config=ResidualConfig())
    assert len(reads) == 2
    with torch.inference_mode():
        frozen = torch.randn(10, 4)
    for _ in range(2):  # no version counter: read every time
        ResidualState(frozen, mask_id=9, config=ResidualConfig())
    assert len(reads) == 4


def test_residual_state_accepts_a_finite_half_table():
    state = ResidualState(torch.randn(10, 4).bfloat16(), mask_id=9, config=ResidualConfig())
    assert state.mask_embed.dtype == torch.bfloat16


@pytest.mark.parametrize("t_res", [0.0, 1e-39, math.nan, math.inf, True])
def test_residual_config_refuses_t_res_the_op_cannot_use(t_res):
    with pytest.raises(ValueError, match="t_res must be a finite number >= "):
        ResidualConfig(t_res=t_res)
