#!/usr/bin/env bash
# Compile-checks every CUDA source of the extension with nvcc (sm_75/80/90 + PTX), on a machine
# without a GPU (and usually with a CPU-only torch): a kernel that does not compile fails CI.
#   - the torch-free kernels (.cu) are compiled to objects for each architecture;
#   - the torch glue is compiled against the installed torch's headers with the macros a CUDA
#     build of torch would define, which catches dispatch and API mistakes in the glue.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NVCC=${NVCC:-nvcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

torch_include=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
cuda_include=-I${CUDA_HOME:-/usr/local/cuda}/include

# sm_75/80/90 machine code and compute_90 PTX: the default TORCH_CUDA_ARCH_LIST of setup.py
# ("7.5;8.0;9.0+PTX"), so that newer GPUs (sm_100, sm_120) JIT the PTX instead of finding
# "no kernel image"
for arch in 75 80 90 ptx90; do
  for src in csrc/cuda/*.cu; do
    echo "nvcc ${arch}: ${src}"
    if [ "$arch" = ptx90 ]; then target=(-arch=compute_90 -code=compute_90); else target=(-arch="sm_${arch}"); fi
    # the same half-type macros torch's CUDAExtension passes to nvcc
    "$NVCC" -c -std=c++17 -O3 --use_fast_math "${target[@]}" -Xcompiler -Wall \
      -Werror all-warnings --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ \
      -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Icsrc "$src" -o "$out/$(basename "$src").sm${arch}.o"
  done
done

for src in csrc/cuda/*.cpp; do
  echo "nvcc host glue: ${src}"
  "$NVCC" -c -std=c++20 -x c++ -DC10_USING_CUSTOM_GENERATED_MACROS -DC10_CUDA_BUILD_SHARED_LIBS \
    -Icsrc $torch_include $cuda_include \
    $("$PYTHON" -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])") \
    "$src" -o "$out/$(basename "$src").o"
done
echo "CUDA sources compile for sm_75, sm_80, sm_90 and compute_90 PTX"
