// CUDA implementation of rcd_ext::residual_context_top_k: torch glue around the one kernel in
// residual_context_top_k_kernels.cu (the schema is defined with the CPU kernel, in
// residual_context_top_k_cpu.cpp). Includes c10/cuda headers only, like
// residual_context_cuda.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "cuda/glue_common.h"
#include "cuda/residual_context_top_k_launchers.h"
#include "residual_context.h"
#include "residual_context_top_k.h"

namespace rcd_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> residual_context_top_k_cuda(
    const at::Tensor& logits_in, const at::Tensor& embed_weight_in, const at::Tensor& mask_in,
    const at::Tensor& table_sum_in, double t_res, bool temper_delta, c10::string_view strategy,
    double alpha_scale, int64_t k) {
  const ResidualParams params = check_and_make_params(
      logits_in, embed_weight_in, mask_in, t_res, temper_delta, std::string(strategy),
      alpha_scale);
  check_top_k_args(logits_in, embed_weight_in, table_sum_in, k);
  TORCH_CHECK_VALUE(k <= cuda::kMaxTopK, "residual_top_k=", k, " is above the CUDA kernel's ",
                    cuda::kMaxTopK, " (the Python front runs larger k in plain torch)");
  const int64_t rows = logits_in.size(0);
  const int64_t vocab = logits_in.size(1);
  TORCH_CHECK_VALUE(vocab <= INT32_MAX && rows <= INT32_MAX, "the CUDA sparse op takes V and N "
                    "below 2^31, got N=", rows, ", V=", vocab);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  at::Tensor out = at::empty({rows, embed_weight_in.size(1)}, embed_weight_in.options());
  at::Tensor alpha = at::empty({rows}, logits_in.options().dtype(at::kFloat));
  if (rows == 0) return {out, alpha};

  // rows read in place with their stride: the logits[:, :V] slice is not copied
  const bool rows_in_place = logits_in.stride(1) == 1 && logits_in.stride(0) >= vocab;
  const at::Tensor logits = rows_in_place ? logits_in : logits_in.contiguous();
  const at::Tensor table =
      embed_weight_in.stride(1) == 1 ? embed_weight_in : embed_weight_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor table_sum = table_sum_in.contiguous();
  at::Tensor status = at::empty({rows}, alpha.options().dtype(at::kInt));
  const cuda::TopKResidualArgs args{logits.data_ptr(),
                                    to_kernel_dtype(logits.scalar_type()),
                                    rows,
                                    vocab,
                                    logits.stride(0),
                                    table.data_ptr(),
                                    mask.data_ptr(),
                                    to_kernel_dtype(table.scalar_type()),
                                    table.stride(0),
                                    table.size(1),
                                    table_sum.data_ptr<float>(),
                                    params.inv_t_res,
                                    params.temper_delta,
                                    strategy_code(params.strategy),
                                    params.alpha_scale,
                                    params.log_vocab,
                                    static_cast<int32_t>(k),
                                    out.data_ptr(),
                                    alpha.data_ptr<float>(),
                                    status.data_ptr<int32_t>()};
  const cudaError_t err =
      cuda::launch_top_k_residual(args, c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "top_k_residual");
  // One device-to-host copy per call so that bad rows raise, as on the CPU. A stream being
  // captured into a CUDA graph cannot copy to the host: there bad rows come out NaN instead.
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    raise_for_row_status(status.cpu());
  }
  return {out, alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcd_ext, CUDA, m) {
  m.impl("residual_context_top_k", &residual_context_top_k_cuda);
}

}  // namespace rcd_ext
