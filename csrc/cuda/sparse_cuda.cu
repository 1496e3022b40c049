// The CUDA launchers of the sparse-teacher ops: checks, outputs, dtype
// dispatch and the launches on the current stream (device code:
// sparse_kernel.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../sparse_op.h"
#include "sparse_kernel.cuh"

namespace kdfused {
namespace {

// Allows a kernel more than the default 48 KiB of dynamic shared memory when
// it needs it; a size the device cannot give is an error that says so.
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes, const char* what) {
  constexpr size_t kDefault = 48 * 1024;
  if (bytes <= kDefault) return;
  int device = 0, most = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(bytes <= static_cast<size_t>(most), "kdfused: ", what, " needs ",
                    text(static_cast<int64_t>(bytes)),
                    " bytes of shared memory per block, more "
                    "than this GPU's ",
                    text(static_cast<int64_t>(most)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

}  // namespace

DistillResult sparse_cuda(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                          double label_smoothing) {
  const SparseProblem prob = prepare_sparse(
      student, indices, logprobs, labels, grad_scale, temperature, store_temperature, tail, alpha,
      divergence, beta, ignore_index, scale_by_t2, c10::DeviceType::CUDA, label_smoothing);
  const DistillProblem& base = prob.base;
  TORCH_CHECK_VALUE(base.n <= std::numeric_limits<int32_t>::max() &&
                        base.v <= std::numeric_limits<int32_t>::max(),
                    "kdfused: at most 2^31 - 1 rows and columns per call, got ",
                    text(base.student.sizes()));
  const c10::cuda::CUDAGuard guard(student.device());
  auto [hard, soft, grad] = allocate_outputs(base, compute_grad, grad_out);
  if (base.n == 0) return {hard, soft, grad};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared = cuda::sparse_shared_bytes(base.v, prob.k);
  KDFUSED_DISPATCH_LOGITS(base.student.scalar_type(), "kdfused_sparse_cuda", [&] {
    const auto kernel = cuda::sparse_rows_kernel<scalar_t>;
    allow_shared(kernel, shared, "the sparse-teacher loss at this V and k");
    const int threads = cuda::threads_for(base.v, 16 / sizeof(scalar_t), cuda::kMaxThreads);
    kernel<<<static_cast<unsigned>(base.n), threads, shared, stream>>>(
        base.student.const_data_ptr<scalar_t>(), base.student.stride(0),
        prob.indices.const_data_ptr<int64_t>(), prob.logprobs.const_data_ptr<float>(), prob.k,
        base.labels ? base.labels->const_data_ptr<int64_t>() : nullptr,
        grad_scale ? grad_scale->const_data_ptr<float>() : nullptr, hard.data_ptr<float>(),
        soft.data_ptr<float>(), compute_grad ? grad.data_ptr<scalar_t>() : nullptr, base.v,
        base.params, prob.tail, prob.st_over_t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {hard, soft, grad};
}

std::tuple<at::Tensor, at::Tensor> sparse_topk_cuda(const at::Tensor& logits, int64_t k,
                                                    double temperature) {
  const at::Tensor x = prepare_topk(logits, k, temperature, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(k <= cuda::kMaxTopk,
                    "kdfused: the CUDA top-k kernel takes k <= ", text(cuda::kMaxTopk),
                    ", got k = ", text(k));
  const int64_t n = x.size(0), v = x.size(1);
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int32_t>::max(),
                    "kdfused: at most 2^31 - 1 rows per call, got N = ", text(n));
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor idx = at::empty({n, k}, x.options().dtype(at::kLong));
  at::Tensor lp = at::empty({n, k}, x.options().dtype(at::kFloat));
  if (n == 0) return {idx, lp};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared = cuda::topk_shared_bytes(k);
  KDFUSED_DISPATCH_LOGITS(x.scalar_type(), "kdfused_sparse_topk_cuda", [&] {
    const auto kernel = cuda::topk_rows_kernel<scalar_t>;
    allow_shared(kernel, shared, "top-k at this k");
    const int threads = cuda::threads_for(v, 16 / sizeof(scalar_t), cuda::kMaxThreads);
    kernel<<<static_cast<unsigned>(n), threads, shared, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), v, k, static_cast<float>(1.0 / temperature),
        idx.data_ptr<int64_t>(), lp.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {idx, lp};
}

}  // namespace kdfused
