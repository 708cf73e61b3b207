"""Loads the compiled kernels once and remembers what loaded and why not.

The extension must never be replaced silently: if rcd_ext._C fails to import we warn loudly and
`rcd_ext.ops.backend()` says "reference"; set RCD_EXT_REQUIRE_KERNELS=1 to make it an error.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

cpu_error: str | None = None
cuda_error: str | None = None
cpu_loaded = False
cuda_loaded = False

try:
    importlib.import_module("rcd_ext._C")
    cpu_loaded = True
except ImportError as exc:  # an unbuilt or ABI-incompatible extension
    cpu_error = f"{type(exc).__name__}: {exc}"
    if os.environ.get("RCD_EXT_REQUIRE_KERNELS") == "1":
        raise
    warnings.warn(
        "rcd_ext: the compiled extension rcd_ext._C did not load "
        f"({cpu_error}); residual_context falls back to the slow plain-torch reference. "
        "Rebuild with `pip install --no-build-isolation -e .` against the torch you run.",
        RuntimeWarning,
        stacklevel=2,
    )

if cpu_loaded and torch.version.cuda is not None:
    try:
        importlib.import_module("rcd_ext._C_cuda")
        cuda_loaded = True
    except ImportError as exc:
        cuda_error = f"{type(exc).__name__}: {exc}"
        if torch.cuda.is_available():
            warnings.warn(
                "rcd_ext: CUDA is available but the CUDA kernel rcd_ext._C_cuda did not load "
                f"({cuda_error}); CUDA inputs use the plain-torch reference.",
                RuntimeWarning,
                stacklevel=2,
            )
