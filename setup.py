"""Builds rcd_ext._C (op schema + CPU kernel) and, with a CUDA torch and nvcc, rcd_ext._C_cuda.

The two modules are separate on purpose: a wheel built with CUDA must still import under a
CPU-only torch (one combined module fails there on libc10_cuda.so). Whether to build CUDA is
decided from torch.version.cuda and the toolkit, never from torch.cuda.is_available(): build
machines usually have no GPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.dist import Distribution

ROOT = Path(__file__).parent.resolve()
CSRC = Path("csrc")


def _extensions() -> tuple[list, dict]:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if os.environ.get("RCD_EXT_BUILD_KERNELS", "1").lower() in ("0", "false", "no"):
        # a second venv of one checkout (scripts/make_sglang_venv.sh): keep the in-tree _C.so
        # built for the first venv's torch (loaded here if its ABI fits, else the reference runs)
        return [], {}
    debug = os.environ.get("RCD_EXT_DEBUG_BUILD") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # Let torch pick the C++ standard (torch >= 2.13 headers need C++20).
    common = {
        "include_dirs": [str(ROOT / CSRC)],
        "py_limited_api": True,
        "define_macros": [("Py_LIMITED_API", "0x030A0000")],
    }
    extensions = [
        CppExtension(
            "rcd_ext._C",
            sources=[str(CSRC / "residual_context_cpu.cpp"),
                     str(CSRC / "residual_context_top_k_cpu.cpp"),
                     str(CSRC / "module_stub.cpp")],
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp-simd", "-fno-trapping-math"]},
            **common,
        )
    ]
    if _want_cuda(torch):
        # machine code for Turing/Ampere/Hopper, and PTX that newer GPUs (Blackwell) compile at
        # load: without it they would find "no kernel image" (the first-call self-check would
        # then fall back to the reference)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;9.0+PTX")
        extensions.append(
            CUDAExtension(
                "rcd_ext._C_cuda",
                sources=[
                    str(CSRC / "cuda" / "residual_context_kernels.cu"),
                    str(CSRC / "cuda" / "residual_context_cuda.cpp"),
                    str(CSRC / "cuda" / "residual_context_top_k_kernels.cu"),
                    str(CSRC / "cuda" / "residual_context_top_k_cuda.cpp"),
                    str(CSRC / "cuda" / "module_stub_cuda.cpp"),
                ],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
                **common,
            )
        )
    return extensions, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


def _want_cuda(torch) -> bool:
    choice = os.environ.get("RCD_EXT_BUILD_CUDA", "auto").lower()
    if choice in ("0", "false", "no"):
        return False
    has_toolkit = bool(os.environ.get("CUDA_HOME")) or shutil.which("nvcc") is not None
    wanted = torch.version.cuda is not None and has_toolkit
    if choice in ("1", "true", "yes") and not wanted:
        raise RuntimeError(
            f"RCD_EXT_BUILD_CUDA={choice} but torch {torch.__version__} has no CUDA "
            "(torch.version.cuda is None) or nvcc/CUDA_HOME is missing"
        )
    if wanted and not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda").is_dir():
        # torch otherwise guesses CUDA_HOME from the nvcc wrapper's directory (/usr/local).
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    return wanted


def _packages() -> tuple[list[str], dict[str, str]]:
    from setuptools import find_packages

    # integrations/ sits at the top of the repository (next to the engines it serves) but installs
    # as the subpackage rcd_ext.integrations.
    integrations = ["rcd_ext.integrations"] + [
        f"rcd_ext.integrations.{name}"
        for name in find_packages("integrations", exclude=["lm_eval_startup"])
    ]
    # lm_eval_startup installs as a top-level package: the .pth below imports it at interpreter
    # start, which must not import rcd_ext (and so torch).
    return find_packages(include=["rcd_ext", "rcd_ext.*"]) + integrations + [STARTUP], {
        "rcd_ext.integrations": "integrations",
        STARTUP: "integrations/lm_eval_startup",
    }


# `rcd_ext_lm_eval.pth` must land in site-packages itself (only there are .pth files read). A
# wheel's `<name>.data/purelib/` is installed there; install_data writes into
# `<name>.data/data/`, so "../purelib" reaches it, in the wheel and in the editable wheel alike.
STARTUP = "rcd_ext_lm_eval_startup"
STARTUP_PTH = ("../purelib", ["integrations/lm_eval_startup/rcd_ext_lm_eval.pth"])


class DataFilesInEditableInstalls(Distribution):
    """setuptools' editable_wheel installs data files only if `dist.has_data()` is true, a
    method Distribution lacks (it has `has_data_files`): without it `pip install -e .` would
    leave the .pth out."""

    def has_data(self) -> bool:
        return self.has_data_files()


ext_modules, cmdclass = _extensions()
packages, package_dir = _packages()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    packages=packages,
    package_dir=package_dir,
    data_files=[STARTUP_PTH],
    distclass=DataFilesInEditableInstalls,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
