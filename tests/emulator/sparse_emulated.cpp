// kdfused_emulated::sparse_distill_forward and ::sparse_topk: the CUDA
// sparse-teacher kernels of csrc/cuda/sparse_kernel.cuh run on CPU tensors by
// cuda_emulator.h, through the CUDA ops' own launch code
// (csrc/cuda/sparse_launch.cuh).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "distill_op.h"
#include "sparse_op.h"
// clang-format off: the emulator (emulated_launcher.h) after the torch headers,
// the device code (cuda/*_launch.cuh) after the emulator
#include "emulated_launcher.h"
#include "cuda/sparse_launch.cuh"
// clang-format on

namespace kdfused {
namespace {

DistillResult sparse_emulated(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                              double label_smoothing, const std::optional<at::Tensor>& offsets) {
  const SparseProblem prob =
      prepare_sparse(KDFUSED_SPARSE_NAMES, c10::DeviceType::CPU, label_smoothing, offsets);
  auto [hard, soft, grad] = allocate_outputs(prob.base, compute_grad, grad_out);
  cuda::launch_sparse(EmulatedLauncher{}, prob, hard, soft, compute_grad ? &grad : nullptr);
  return {hard, soft, grad};
}

std::tuple<at::Tensor, at::Tensor> topk_emulated(const at::Tensor& logits, int64_t k,
                                                 double temperature) {
  const at::Tensor x = prepare_topk(logits, k, temperature, c10::DeviceType::CPU);
  cuda::check_topk_k(k);
  at::Tensor idx = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  at::Tensor lp = at::empty({x.size(0), k}, x.options().dtype(at::kFloat));
  cuda::launch_topk(EmulatedLauncher{}, x, k, temperature, idx, lp);
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
