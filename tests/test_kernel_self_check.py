"""The first-call self-check of kernels CI cannot run, exercised on the CPU: the CPU is made a
"self-checked" device and the compiled kernel is replaced by deliberately wrong stand-ins."""

from __future__ import annotations

import pytest
import torch

from rcd_ext import kernel_self_check, ops
from rcd_ext.cli import main
from rcd_ext.op_reference import residual_context_reference


@pytest.fixture
def cpu_self_checked(monkeypatch):
    monkeypatch.setattr(kernel_self_check, "SELF_CHECKED_DEVICE_TYPES", {"cpu"})
    kernel_self_check.forget_results()
    yield
    kernel_self_check.forget_results()


def inputs():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=generator)
    table = torch.randn(50, 8, generator=generator)
    return logits, table, table[0]


def off_by_a_little(*args):
    embeds, alpha = torch.ops.rcd_ext.residual_context(*args)
    return embeds + 0.05, alpha


def no_kernel_image(*args):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device\n"
                       "CUDA kernel errors might be asynchronously reported")


def counting(calls):
    def kernel(*args):
        calls.append(args[0].shape)
        return torch.ops.rcd_ext.residual_context(*args)
    return kernel


def test_a_correct_kernel_passes_once_and_keeps_running(cpu_self_checked, monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "_exact_kernel", counting(calls))
    logits, table, mask = inputs()
    with _no_warning():
        ops.residual_context(logits, table, mask, t_res=0.9)
        ops.residual_context(logits, table, mask, t_res=0.9)
    checked = len(ops._SELF_CHECK_CASES)
    assert len(calls) == checked + 2  # the check's cases once, then both real calls
    result = kernel_self_check.run_self_check("residual_context", "cpu")
    assert result.passed and result.detail == "agrees with the reference"
    assert ops.backend("cpu") == "cpu-kernel"


@pytest.mark.parametrize("stand_in,detail", [
    (off_by_a_little, "max |kernel - reference|"),
    (no_kernel_image, "raised RuntimeError: CUDA error: no kernel image is available"),
])
def test_a_wrong_kernel_falls_back_to_the_reference_with_one_warning(
        cpu_self_checked, monkeypatch, stand_in, detail):
    monkeypatch.setattr(ops, "_exact_kernel", stand_in)
    logits, table, mask = inputs()
    with pytest.warns(RuntimeWarning, match="failed its first-call self-check") as caught:
        embeds, alpha = ops.residual_context(logits, table, mask, t_res=0.9)
    assert len(caught) == 1 and detail in str(caught[0].message)
    want_embeds, want_alpha = residual_context_reference(logits, table, mask, t_res=0.9)
    torch.testing.assert_close(embeds, want_embeds)
    torch.testing.assert_close(alpha, want_alpha)
    with _no_warning():  # the verdict is kept: no second check, no second warning
        embeds_again, _ = ops.residual_context(logits, table, mask, t_res=0.9)
    torch.testing.assert_close(embeds_again, want_embeds)
    assert kernel_self_check.failed("residual_context", "cpu")


def test_bad_logits_are_still_refused_after_a_fallback(cpu_self_checked, monkeypatch):
    monkeypatch.setattr(ops, "_exact_kernel", no_kernel_image)
    logits, table, mask = inputs()
    logits[2, 3] = float("nan")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="logits row 2 contains NaN"):
        ops.residual_context(logits, table, mask)


def test_devices_ci_runs_are_not_checked(monkeypatch):
    kernel_self_check.forget_results()
    monkeypatch.setattr(ops, "_exact_kernel", off_by_a_little)  # would fail a check
    logits, table, mask = inputs()
    embeds, _ = ops.residual_context(logits, table, mask)
    want, _ = residual_context_reference(logits, table, mask)
    assert (embeds - want).abs().max() > 0.04  # the stand-in ran: no check on the CPU
    assert not kernel_self_check.failed("residual_context", "cpu")


def test_rcd_info_reports_the_verdicts(cpu_self_checked, monkeypatch, capsys):
    monkeypatch.setattr(ops, "_exact_kernel", off_by_a_little)
    with pytest.warns(RuntimeWarning):
        status = main(["info", "--rows", "3", "--vocab", "50", "--dim", "8"])
    out = capsys.readouterr().out
    assert "cpu residual_context kernel self-check: FAILED, the reference runs instead" in out
    assert status == 1


def test_one_check_per_op_name():
    with pytest.raises(ValueError, match="already registered"):
        kernel_self_check.register_self_check("residual_context", lambda device: None)
    assert "residual_context" in kernel_self_check.registered_ops()


class _no_warning:
    """Fails the test if a RuntimeWarning is raised inside the block."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        return False
