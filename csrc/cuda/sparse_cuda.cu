// The CUDA ops of the sparse teacher: checks, outputs and the launches
// (sparse_launch.cuh) on the current stream (device code: sparse_kernel.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "../sparse_op.h"
#include "cuda_launcher.cuh"
#include "sparse_launch.cuh"

namespace kdfused {

DistillResult sparse_cuda(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                          double label_smoothing, const std::optional<at::Tensor>& offsets) {
  const SparseProblem prob =
      prepare_sparse(KDFUSED_SPARSE_NAMES, c10::DeviceType::CUDA, label_smoothing, offsets);
  const DistillProblem& base = prob.base;
  check_row_count(base.n);
  // The kernel keeps a row's kept ids as int32.
  TORCH_CHECK_VALUE(base.v <= std::numeric_limits<int32_t>::max(),
                    "kdfused: at most 2^31 - 1 columns per call, got V = ", text(base.v));
  const c10::cuda::CUDAGuard guard(student.device());
  auto [hard, soft, grad] = allocate_outputs(base, compute_grad, grad_out);
  cuda::launch_sparse(cuda::CudaLauncher{}, prob, hard, soft, compute_grad ? &grad : nullptr);
  return {hard, soft, grad};
}

std::tuple<at::Tensor, at::Tensor> sparse_topk_cuda(const at::Tensor& logits, int64_t k,
                                                    double temperature) {
  const at::Tensor x = prepare_topk(logits, k, temperature, c10::DeviceType::CUDA);
  cuda::check_topk_k(k);
  check_row_count(x.size(0));
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor idx = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  at::Tensor lp = at::empty({x.size(0), k}, x.options().dtype(at::kFloat));
  cuda::launch_topk(cuda::CudaLauncher{}, x, k, temperature, idx, lp);
  return {idx, lp};
}

}  // namespace kdfused
