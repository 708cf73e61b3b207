"""`--device` values checked against the installed torch before a model is put there."""

from __future__ import annotations

from rcd_ext.commands._usage import UsageError

__all__ = ["check_device", "default_device"]


def default_device() -> str:
    """cuda when this torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(option: str, spec: str | None) -> str:
    """`spec` (None: the default) if this torch can run there, else UsageError naming `option`."""
    import torch

    if spec is None:
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {spec}: not a device name (use cpu, cuda, cuda:N or "
                         "mps)") from None
    if device.type == "cpu":
        return spec
    if device.type == "cuda":
        _check_cuda(option, spec, device.index)
        return spec
    backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise UsageError(f"{option} {spec}: this torch {torch.__version__} cannot use "
                         f"{device.type} devices here (use --device cpu)")
    return spec


def _check_cuda(option: str, spec: str, index: int | None) -> None:
    import torch

    if torch.version.cuda is None:
        raise UsageError(f"{option} {spec}: this torch {torch.__version__} is built without "
                         "CUDA (use --device cpu, or install a CUDA build of torch)")
    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError(f"{option} {spec}: no CUDA device is visible (check "
                         "CUDA_VISIBLE_DEVICES and the driver, or use --device cpu)")
    if index is not None and index >= count:
        raise UsageError(f"{option} {spec}: only {count} CUDA device(s) are visible "
                         f"(use cuda:0..cuda:{count - 1})")
