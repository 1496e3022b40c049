// The launches of the sparse-teacher kernels (sparse_kernel.cuh), through a
// launcher policy (launch.cuh): sparse_cuda.cu's, and the emulator's in
// tests/emulator/.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "../sparse_op.h"
#include "launch.cuh"
#include "sparse_kernel.cuh"

namespace kdfused {
namespace cuda {

// A block per row of v logits of type S (about a 16-byte pack per thread, at
// most kMaxThreads), with `shared` bytes of dynamic shared memory.
template <typename S>
Launch row_launch(int64_t n, int64_t v, size_t shared) {
  return Launch{n, threads_for(v, 16 / sizeof(S), kMaxThreads), 1, shared};
}

// sparse_rows_kernel over the problem's rows: hard and soft [N] and, when
// grad is given (an [N, V] contiguous buffer of the student's dtype), the
// gradient.
template <typename Launcher>
void launch_sparse(const Launcher& launcher, const SparseProblem& prob, const at::Tensor& hard,
                   const at::Tensor& soft, const at::Tensor* grad) {
  const DistillProblem& base = prob.base;
  if (base.n == 0) return;
  const size_t shared = sparse_shared_bytes(base.v, prob.k);
  KDFUSED_DISPATCH_LOGITS(base.student.scalar_type(), "kdfused_sparse", [&] {
    const auto kernel = &sparse_rows_kernel<scalar_t>;
    launcher.allow_shared(kernel, shared, "the sparse-teacher loss at this V and k");
    launcher.launch(row_launch<scalar_t>(base.n, base.v, shared), kernel,
                    base.student.const_data_ptr<scalar_t>(), base.student.stride(0), prob.entries(),
                    base.label_data(), base.grad_scale_data(), hard.data_ptr<float>(),
                    soft.data_ptr<float>(), grad ? grad->data_ptr<scalar_t>() : nullptr, base.v,
                    base.params, prob.tail, prob.st_over_t);
  });
}

// The top-k kernel's bound on k, checked before its outputs are allocated.
inline void check_topk_k(int64_t k) {
  TORCH_CHECK_VALUE(k <= kMaxTopk, "kdfused: the CUDA top-k kernel takes k <= ", text(kMaxTopk),
                    ", got k = ", text(k));
}

// topk_rows_kernel over the rows of x ([N, V], last dim contiguous): the k
// largest log_softmax(x / temperature) per row into lp [N, k], their ids into
// idx [N, k].
template <typename Launcher>
void launch_topk(const Launcher& launcher, const at::Tensor& x, int64_t k, double temperature,
                 const at::Tensor& idx, const at::Tensor& lp) {
  const int64_t n = x.size(0), v = x.size(1);
  if (n == 0) return;
  const size_t shared = topk_shared_bytes(k);
  KDFUSED_DISPATCH_LOGITS(x.scalar_type(), "kdfused_sparse_topk", [&] {
    const auto kernel = &topk_rows_kernel<scalar_t>;
    launcher.allow_shared(kernel, shared, "top-k at this k");
    launcher.launch(row_launch<scalar_t>(n, v, shared), kernel, x.const_data_ptr<scalar_t>(),
                    x.stride(0), v, k, static_cast<float>(1.0 / temperature),
                    idx.data_ptr<int64_t>(), lp.data_ptr<float>());
  });
}

}  // namespace cuda
}  // namespace kdfused
