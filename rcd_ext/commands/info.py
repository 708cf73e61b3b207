"""`rcd info`: what is installed, which kernel runs where, and a checked run of the fused op."""

from __future__ import annotations

import argparse
import platform


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="show versions and kernel backends, and check the fused op on a small input"
    )
    parser.add_argument("--rows", type=int, default=64, help="masked positions N")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    parser.add_argument("--dim", type=int, default=1024, help="embedding width D")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    import rcd_ext
    from rcd_ext import kernel_self_check, ops

    print(f"rcd-ext {rcd_ext.__version__}  torch {torch.__version__}  "
          f"python {platform.python_version()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    status = 0
    for device in devices:
        status |= report_self_checks(device)
    for device in devices:
        print(f"  {device}: {ops.backend(device)}")
    for device, error in ops.load_errors().items():
        if error:
            print(f"  {device} kernel did not load: {error}")

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=generator) * 3
    table = torch.randn(args.vocab, args.dim, generator=generator) * 0.02
    mask = torch.randn(args.dim, generator=generator) * 0.02
    for device in devices:
        if ops.backend(device) == "reference":
            # the op would run the reference itself: comparing it with itself checks nothing
            why = ("its kernel failed the self-check above" if kernel_self_check.failed(
                "residual_context", device) else "no compiled kernel loaded")
            print(f"residual_context on {device}: {why}, so none was checked (the slower "
                  "plain-torch reference runs instead; rebuild with `pip install "
                  "--no-build-isolation -e .` against the installed torch)")
            status = 1
            continue
        z, e, m = logits.to(device), table.to(device), mask.to(device)
        ops.residual_context(z, e, m)  # warm-up
        start = time.perf_counter()
        embeds, alpha = ops.residual_context(z, e, m, t_res=0.92)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        want, want_alpha = ops.residual_context_reference(z, e, m, t_res=0.92)
        error = (embeds - want).abs().max().item()
        ok = error < 1e-4 and (alpha - want_alpha).abs().max().item() < 1e-4
        status |= 0 if ok else 1
        print(f"residual_context N={args.rows} V={args.vocab} D={args.dim} fp32 on {device}: "
              f"{elapsed * 1e3:.1f} ms, mean alpha {alpha.mean().item():.3f}, "
              f"max |kernel - reference| {error:.2e} {'ok' if ok else 'MISMATCH'}")
    return status


def report_self_checks(device: str) -> int:
    """Print the first-call self-check verdict of each kernel on `device` (devices whose kernels
    CI never ran); 1 if any failed."""
    from rcd_ext import _extension, kernel_self_check

    device_type = device.split(":", 1)[0]
    loaded = {"cpu": _extension.cpu_loaded, "cuda": _extension.cuda_loaded}.get(device_type)
    if device_type not in kernel_self_check.SELF_CHECKED_DEVICE_TYPES or not loaded:
        return 0
    failed = 0
    for op in kernel_self_check.registered_ops():
        result = kernel_self_check.run_self_check(op, device)
        verdict = "passed" if result.passed else "FAILED, the reference runs instead"
        print(f"  {result.device} {op} kernel self-check: {verdict} ({result.detail})")
        failed |= not result.passed
    return int(failed)
