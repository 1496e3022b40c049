// kdfused_emulated::distill_forward: the CUDA kernel of csrc/cuda/ run on CPU
// tensors by cuda_emulator.h, behind the same schema and through the CUDA op's
// own launch code (csrc/cuda/distill_launch.cuh), row splits
// (KDFUSED_CUDA_SPLIT) included.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "distill_op.h"
// clang-format off: the emulator (emulated_launcher.h) after the torch headers,
// the device code (cuda/*_launch.cuh) after the emulator
#include "emulated_launcher.h"
#include "cuda/distill_launch.cuh"
// clang-format on

namespace kdfused {
namespace {

DenseResult distill_emulated(KDFUSED_KERNEL_ARGS, bool compute_grad, const at::Tensor* grad_out,
                             double label_smoothing, bool student_entropy) {
  const DistillProblem prob =
      prepare_problem(KDFUSED_KERNEL_NAMES, c10::DeviceType::CPU, label_smoothing);
  auto [hard, soft, grad] = allocate_outputs(prob, compute_grad, grad_out);
  at::Tensor entropy = allocate_entropy(prob, student_entropy);
  cuda::launch_distill(EmulatedLauncher{}, prob, hard, soft, compute_grad ? &grad : nullptr,
                       student_entropy ? &entropy : nullptr);
  return {hard, soft, grad, entropy};
}

}  // namespace
}  // namespace kdfused

TORCH_LIBRARY(kdfused_emulated, m) {
  m.def(kdfused::kDistillForwardSchema);
  m.def(kdfused::kDistillForwardOutSchema);
}

TORCH_LIBRARY_IMPL(kdfused_emulated, CPU, m) {
  m.impl("distill_forward", &kdfused::distill_forward_op<kdfused::distill_emulated>);
  m.impl("distill_forward_out", &kdfused::distill_forward_out_op<kdfused::distill_emulated>);
}
