"""First-call self-check of compiled kernels that CI cannot run.

CI compiles the CUDA kernels but has no GPU, so a CUDA kernel may meet its first GPU in a user's
process. The first time an op's kernel is asked for on such a device, it is run on a small input
next to the plain-torch reference; if it raises (e.g. "no kernel image is available" on an
architecture the build did not target) or disagrees, one warning says so and that op uses the
reference on that device for the rest of the process. `rcd info` prints the verdicts.

One registry: an op registers `check(device) -> None | str` (None: the kernel agrees; a string:
what went wrong) under its name. Devices whose kernels CI runs (the CPU) are not checked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

# device types whose compiled kernels no CI run has executed
SELF_CHECKED_DEVICE_TYPES = {"cuda"}

KernelCheck = Callable[[torch.device], "str | None"]


@dataclass(frozen=True)
class SelfCheckResult:
    """Verdict of one op's kernel on one device."""

    op: str
    device: str
    passed: bool
    detail: str


_checks: dict[str, KernelCheck] = {}
_results: dict[tuple[str, str], SelfCheckResult] = {}


def register_self_check(op: str, check: KernelCheck) -> None:
    """Register the self-check of `op`'s kernel (one per op name)."""
    if op in _checks and _checks[op] is not check:
        raise ValueError(f"a self-check for op {op!r} is already registered")
    _checks[op] = check


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def kernel_usable(op: str, device: str | torch.device) -> bool:
    """Whether `op`'s compiled kernel may run on `device`; checks it on first use there.

    Under torch.compile tracing or CUDA graph capture nothing is run: a verdict already reached
    is used, and a kernel not yet checked is used unchecked (graphs are normally captured after
    eager warm-up calls, which check it; `rcd info` checks too).
    """
    device = torch.device(device)
    if device.type not in SELF_CHECKED_DEVICE_TYPES:
        return True
    key = (op, _device_key(device))
    result = _results.get(key)
    if result is None:
        if torch.compiler.is_compiling() or _capturing(device):
            return True  # nothing may run here; the check waits for the next eager call
        result = run_self_check(op, device)
    return result.passed


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def run_self_check(op: str, device: str | torch.device) -> SelfCheckResult:
    """Run (once per process) and return the verdict of `op`'s kernel on `device`."""
    key = (op, _device_key(torch.device(device)))
    if key in _results:
        return _results[key]
    check = _checks.get(op)
    if check is None:
        raise KeyError(f"no self-check registered for op {op!r}; registered: {sorted(_checks)}")
    try:
        failure = check(torch.device(key[1]))
    except Exception as error:  # noqa: BLE001 - any failure of the kernel is the verdict
        first_line = (str(error).splitlines() or [""])[0]
        failure = f"raised {type(error).__name__}: {first_line}"
    result = SelfCheckResult(op, key[1], failure is None, failure or "agrees with the reference")
    _results[key] = result
    if not result.passed:
        warnings.warn(f"rcd_ext: the compiled {op} kernel on {key[1]} failed its first-call "
                      f"self-check ({result.detail}); {op} uses the plain-torch reference on "
                      f"{key[1]} from now on (slower, correct). Please report this with "
                      "`rcd info` output.", RuntimeWarning, stacklevel=3)
    return result


def failed(op: str, device: str | torch.device) -> bool:
    """True once `op`'s kernel has failed its self-check on `device` (never runs the check)."""
    device = torch.device(device)
    if device.type not in SELF_CHECKED_DEVICE_TYPES:
        return False
    result = _results.get((op, _device_key(device)))
    return result is not None and not result.passed


def registered_ops() -> list[str]:
    """Names of the ops that have a self-check."""
    return sorted(_checks)


def forget_results() -> None:
    """Forget every verdict (tests; a process that rebuilt its kernels)."""
    _results.clear()
