// kdfused_emulated::distill_stats, ::distill_jsd_sums and ::distill_grad: the
// vocab-parallel phases' CUDA kernels (csrc/cuda/parallel_kernel.cuh) run on
// CPU tensors by cuda_emulator.h, through the CUDA ops' own launch code
// (csrc/cuda/parallel_launch.cuh).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "distill_op.h"
#include "parallel_op.h"
// clang-format off: the emulator (emulated_launcher.h) after the torch headers,
// the device code (cuda/*_launch.cuh) after the emulator
#include "emulated_launcher.h"
#include "cuda/parallel_launch.cuh"
// clang-format on

namespace kdfused {
namespace {

at::Tensor stats_emulated(KDFUSED_PHASE_ARGS) {
  const DistillProblem prob = prepare_shard(KDFUSED_PHASE_NAMES, c10::DeviceType::CPU);
  at::Tensor out = at::empty({prob.n, 12}, prob.student.options().dtype(at::kFloat));
  cuda::launch_shard_stats(EmulatedLauncher{}, prob, column_offset, vocab, out);
  return out;
}

at::Tensor jsd_sums_emulated(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob = prepare_shard(KDFUSED_PHASE_NAMES, c10::DeviceType::CPU);
  check_consts(consts, prob);
  at::Tensor out = at::empty({prob.n, 2}, prob.student.options().dtype(at::kFloat));
  cuda::launch_shard_jsd(EmulatedLauncher{}, prob, consts, out);
  return out;
}

at::Tensor grad_emulated(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob = prepare_shard(KDFUSED_PHASE_NAMES, c10::DeviceType::CPU);
  check_consts(consts, prob);
  at::Tensor grad = at::empty({prob.n, prob.v}, prob.student.options());
  cuda::launch_shard_grad(EmulatedLauncher{}, prob, column_offset, consts, grad);
  return grad;
}

}  // namespace
}  // namespace kdfused

TORCH_LIBRARY_FRAGMENT(kdfused_emulated, m) {
  m.def(kdfused::kDistillStatsSchema);
  m.def(kdfused::kDistillJsdSumsSchema);
  m.def(kdfused::kDistillGradSchema);
}

TORCH_LIBRARY_IMPL(kdfused_emulated, CPU, m) {
  m.impl("distill_stats", &kdfused::stats_emulated);
  m.impl("distill_jsd_sums", &kdfused::jsd_sums_emulated);
  m.impl("distill_grad", &kdfused::grad_emulated);
}
