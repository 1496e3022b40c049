// The CUDA launcher of kdfused::distill_forward: checks, outputs, dtype
// dispatch and the launch on the current stream (device code: distill_kernel.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../distill_op.h"
#include "distill_kernel.cuh"

namespace kdfused {
namespace {

using cuda::distill_rows_kernel;
using cuda::pack_width;
using cuda::threads_for;

template <typename S, typename Tt>
void launch(const DistillProblem& prob, const std::optional<at::Tensor>& grad_scale,
            at::Tensor& hard, at::Tensor& soft, at::Tensor& grad, bool compute_grad) {
  const int threads = threads_for(prob.v, pack_width<S, Tt>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  distill_rows_kernel<S, Tt><<<static_cast<unsigned>(prob.n), threads, 0, stream>>>(
      prob.student.const_data_ptr<S>(), prob.teacher.const_data_ptr<Tt>(), prob.student.stride(0),
      prob.teacher.stride(0), prob.labels ? prob.labels->const_data_ptr<int64_t>() : nullptr,
      grad_scale ? grad_scale->const_data_ptr<float>() : nullptr, hard.data_ptr<float>(),
      soft.data_ptr<float>(), compute_grad ? grad.data_ptr<S>() : nullptr, prob.v, prob.params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

DistillResult distill_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& labels,
                                   const std::optional<at::Tensor>& grad_scale, double temperature,
                                   double alpha, c10::string_view divergence, double beta,
                                   int64_t ignore_index, bool scale_by_t2, bool compute_grad) {
  const DistillProblem prob =
      prepare_problem(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                      ignore_index, scale_by_t2, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(prob.n <= std::numeric_limits<int32_t>::max(),
                    "kdfused: at most 2^31 - 1 rows per call, got N = ", text(prob.n));
  const c10::cuda::CUDAGuard guard(student.device());
  auto [hard, soft, grad] = allocate_outputs(prob, compute_grad);
  if (prob.n == 0) return {hard, soft, grad};

  KDFUSED_DISPATCH_LOGITS(prob.student.scalar_type(), "kdfused_distill_cuda", [&] {
    using student_t = scalar_t;
    KDFUSED_DISPATCH_LOGITS(prob.teacher.scalar_type(), "kdfused_distill_cuda", [&] {
      launch<student_t, scalar_t>(prob, grad_scale, hard, soft, grad, compute_grad);
    });
  });
  return {hard, soft, grad};
}

}  // namespace kdfused
