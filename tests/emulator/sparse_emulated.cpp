// kdfused_emulated::sparse_distill_forward and ::sparse_topk: the CUDA
// sparse-teacher kernels of csrc/cuda/sparse_kernel.cuh run on CPU tensors by
// cuda_emulator.h, with the launch configuration of csrc/cuda/sparse_cuda.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "distill_op.h"
#include "sparse_op.h"
// clang-format off: the emulator must come after the torch headers
#include "cuda_emulator.h"
#include "cuda/sparse_kernel.cuh"
// clang-format on

namespace kdfused {
namespace {

DistillResult sparse_emulated(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                              double label_smoothing) {
  const SparseProblem prob = prepare_sparse(
      student, indices, logprobs, labels, grad_scale, temperature, store_temperature, tail, alpha,
      divergence, beta, ignore_index, scale_by_t2, c10::DeviceType::CPU, label_smoothing);
  const DistillProblem& base = prob.base;
  auto [hard, soft, grad] = allocate_outputs(base, compute_grad, grad_out);
  if (base.n == 0) return {hard, soft, grad};
  emu::failed_asserts = 0;
  emu::dynamic_bytes = cuda::sparse_shared_bytes(base.v, prob.k);
  KDFUSED_DISPATCH_LOGITS(base.student.scalar_type(), "kdfused_sparse_emulated", [&] {
    using S = scalar_t;
    emu::launch(
        static_cast<unsigned>(base.n), cuda::threads_for(base.v, 16 / sizeof(S), cuda::kMaxThreads),
        1u, &cuda::sparse_rows_kernel<S>, base.student.const_data_ptr<S>(), base.student.stride(0),
        prob.indices.const_data_ptr<int64_t>(), prob.logprobs.const_data_ptr<float>(), prob.k,
        base.labels ? base.labels->const_data_ptr<int64_t>() : nullptr,
        grad_scale ? grad_scale->const_data_ptr<float>() : nullptr, hard.data_ptr<float>(),
        soft.data_ptr<float>(), compute_grad ? grad.data_ptr<S>() : nullptr, base.v, base.params,
        prob.tail, prob.st_over_t);
  });
  TORCH_CHECK(emu::failed_asserts == 0,
              "CUDA error: device-side assert triggered (emulated: ", emu::first_failed, ")");
  return {hard, soft, grad};
}

std::tuple<at::Tensor, at::Tensor> topk_emulated(const at::Tensor& logits, int64_t k,
                                                 double temperature) {
  const at::Tensor x = prepare_topk(logits, k, temperature, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(k <= cuda::kMaxTopk,
                    "kdfused: the CUDA top-k kernel takes k <= ", text(cuda::kMaxTopk),
                    ", got k = ", text(k));
  const int64_t n = x.size(0), v = x.size(1);
  at::Tensor idx = at::empty({n, k}, x.options().dtype(at::kLong));
  at::Tensor lp = at::empty({n, k}, x.options().dtype(at::kFloat));
  if (n == 0) return {idx, lp};
  emu::dynamic_bytes = cuda::topk_shared_bytes(k);
  KDFUSED_DISPATCH_LOGITS(x.scalar_type(), "kdfused_topk_emulated", [&] {
    using S = scalar_t;
    emu::launch(static_cast<unsigned>(n), cuda::threads_for(v, 16 / sizeof(S), cuda::kMaxThreads),
                1u, &cuda::topk_rows_kernel<S>, x.const_data_ptr<S>(), x.stride(0), v, k,
                static_cast<float>(1.0 / temperature), idx.data_ptr<int64_t>(),
                lp.data_ptr<float>());
  });
  return {idx, lp};
}

}  // namespace
}  // namespace kdfused

TORCH_LIBRARY_FRAGMENT(kdfused_emulated, m) {
  m.def(kdfused::kSparseForwardSchema);
  m.def(kdfused::kSparseForwardOutSchema);
  m.def(kdfused::kSparseTopkSchema);
}

TORCH_LIBRARY_IMPL(kdfused_emulated, CPU, m) {
  m.impl("sparse_distill_forward", &kdfused::sparse_forward_op<kdfused::sparse_emulated>);
  m.impl("sparse_distill_forward_out", &kdfused::sparse_forward_out_op<kdfused::sparse_emulated>);
  m.impl("sparse_topk", &kdfused::topk_emulated);
}
