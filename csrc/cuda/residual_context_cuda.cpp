// CUDA implementation of rcd_ext::residual_context: torch glue around the kernels in
// residual_context_kernels.cu. The p.E product is a cuBLAS GEMM per V-chunk through ATen
// (mm with a float32 output dtype: half inputs, float32 accumulation on the tensor cores).
//
// Includes c10/cuda headers only, so the build needs no cuBLAS development headers (minimal
// CUDA toolkits, the CI compile check's among them, lack them, and ATen/cuda/CUDAContext.h
// includes them); ATen's own mm brings cuBLAS.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/glue_common.h"
#include "cuda/residual_context_launchers.h"
#include "residual_context.h"

namespace rcd_ext {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int32_t multiprocessors(c10::DeviceIndex device) {
  int count = 0;
  check_launch(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute(multiProcessorCount)");
  return count;
}

struct CudaKernels {
  // Large chunks keep the GEMM wide enough to fill the GPU (N=64: 65536 columns per chunk).
  static constexpr int64_t kChunkBudgetElements = int64_t{1} << 22;

  static void row_statistics(const at::Tensor& logits, const ResidualParams& params,
                             at::Tensor& row_max, at::Tensor& row_log_norm, at::Tensor& alpha,
                             at::Tensor& status) {
    const int32_t splits = cuda::statistics_splits(logits.size(0), logits.size(1),
                                                   multiprocessors(logits.device().index()));
    at::Tensor workspace = at::empty(
        {logits.size(0) * splits * cuda::kStatisticsPartialFields}, row_max.options());
    cuda::StatisticsArgs args{logits.data_ptr(),
                              to_kernel_dtype(logits.scalar_type()),
                              logits.size(0),
                              logits.size(1),
                              logits.stride(0),
                              params.inv_t_res,
                              params.temper_delta,
                              strategy_code(params.strategy),
                              params.alpha_scale,
                              params.log_vocab,
                              row_max.data_ptr<float>(),
                              row_log_norm.data_ptr<float>(),
                              alpha.data_ptr<float>(),
                              status.data_ptr<int32_t>(),
                              splits,
                              workspace.data_ptr<float>()};
    check_launch(cuda::launch_row_statistics(args, current_stream()), "row_statistics");
  }

  // One device-to-host copy per call: the op raises on bad rows instead of returning garbage.
  // A stream being captured into a CUDA graph cannot copy to the host: there the check is left
  // to the mix kernel, which writes NaN rows (as torch's own ops would propagate NaN).
  static bool check_rows(const at::Tensor& status) {
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
      return false;
    }
    raise_for_row_status(status.cpu());
    return true;
  }

  static void chunk_probabilities(const at::Tensor& logits, const at::Tensor& row_max,
                                  const at::Tensor& row_log_norm, const ResidualParams& params,
                                  int64_t col0, at::Tensor& probs) {
    cuda::ProbabilitiesArgs args{logits.data_ptr(),
                                 to_kernel_dtype(logits.scalar_type()),
                                 logits.size(0),
                                 logits.size(1),
                                 logits.stride(0),
                                 col0,
                                 probs.size(1),
                                 params.temper_delta ? params.inv_t_res : 1.0f,
                                 row_max.data_ptr<float>(),
                                 row_log_norm.data_ptr<float>(),
                                 probs.data_ptr(),
                                 to_kernel_dtype(probs.scalar_type()),
                                 probs.stride(0)};
    check_launch(cuda::launch_chunk_probabilities(args, current_stream()),
                 "chunk_probabilities");
  }

  static void accumulate(at::Tensor& acc, const at::Tensor& probs,
                         const at::Tensor& embed_chunk) {
    if (embed_chunk.scalar_type() == at::kFloat) {
      // addmm_ would follow torch.backends.cuda.matmul.allow_tf32 (10-bit mantissas, errors
      // ~1e-3); the op promises float32 sums. ATen's own thread-local guard turns TF32 off.
      const at::NoTF32Guard no_tf32;
      acc.addmm_(probs, embed_chunk);
    } else {
      acc.add_(at::mm(probs, embed_chunk, at::kFloat));
    }
  }

  static void mix(const at::Tensor& acc, const at::Tensor& alpha, const at::Tensor& mask,
                  const at::Tensor* unchecked_status, at::Tensor& out) {
    cuda::MixArgs args{acc.data_ptr<float>(),
                       alpha.data_ptr<float>(),
                       mask.data_ptr(),
                       out.data_ptr(),
                       to_kernel_dtype(out.scalar_type()),
                       acc.size(0),
                       acc.size(1),
                       unchecked_status ? unchecked_status->data_ptr<int32_t>() : nullptr};
    check_launch(cuda::launch_mix(args, current_stream()), "mix");
  }
};

std::tuple<at::Tensor, at::Tensor> residual_context_cuda(const at::Tensor& logits,
                                                        const at::Tensor& embed_weight,
                                                        const at::Tensor& mask_embed,
                                                        double t_res, bool temper_delta,
                                                        c10::string_view strategy,
                                                        double alpha_scale) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  return residual_context_driver<CudaKernels>(logits, embed_weight, mask_embed, t_res,
                                              temper_delta, std::string(strategy), alpha_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(rcd_ext, CUDA, m) { m.impl("residual_context", &residual_context_cuda); }

}  // namespace rcd_ext
