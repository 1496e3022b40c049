// kdfused_emulated::sparse_shard_stats, ::sparse_shard_merge and
// ::sparse_shard_grad: the sparse teacher's vocab-parallel CUDA kernels
// (csrc/cuda/sparse_shard_kernel.cuh) run on CPU tensors by cuda_emulator.h,
// through the CUDA ops' own launch code (csrc/cuda/sparse_shard_launch.cuh).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "distill_op.h"
#include "sparse_shard_op.h"
// clang-format off: the emulator (emulated_launcher.h) after the torch headers,
// the device code (cuda/*_launch.cuh) after the emulator
#include "emulated_launcher.h"
#include "cuda/sparse_shard_launch.cuh"
// clang-format on

namespace kdfused {
namespace {

at::Tensor shard_stats_emulated(KDFUSED_SPARSE_PHASE_ARGS) {
  const SparseProblem prob = prepare_sparse_shard(KDFUSED_SPARSE_PHASE_NAMES, c10::DeviceType::CPU);
  at::Tensor out = at::empty({prob.base.n, kSparseStatsFields + prob.k},
                             prob.base.student.options().dtype(at::kFloat));
  cuda::launch_sparse_shard_stats(EmulatedLauncher{}, prob, column_offset, vocab, out);
  return out;
}

at::Tensor shard_grad_emulated(KDFUSED_SPARSE_PHASE_ARGS, const at::Tensor& merged) {
  const SparseProblem prob = prepare_sparse_shard(KDFUSED_SPARSE_PHASE_NAMES, c10::DeviceType::CPU);
  check_merged(merged, prob);
  at::Tensor grad = at::empty({prob.base.n, prob.base.v}, prob.base.student.options());
  cuda::launch_sparse_shard_grad(EmulatedLauncher{}, prob, column_offset, merged, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shard_merge_emulated(KDFUSED_SPARSE_MERGE_ARGS) {
  const SparseMergeProblem prob = prepare_sparse_merge(
      shard_stats, indices, logprobs, labels, temperature, store_temperature, tail, alpha,
      divergence, beta, ignore_index, scale_by_t2, label_smoothing, c10::DeviceType::CPU);
  const auto opts = shard_stats.options();
  at::Tensor merged = at::empty({prob.n, kSparseMergedFields + prob.k}, opts);
  at::Tensor hard = at::empty({prob.n}, opts), soft = at::empty({prob.n}, opts);
  at::Tensor scratch = at::empty({prob.n, prob.k}, opts);
  cuda::launch_sparse_shard_merge(EmulatedLauncher{}, shard_stats, prob, labels, label_smoothing,
                                  scratch, merged, hard, soft);
  return {merged, hard, soft};
}

}  // namespace
}  // namespace kdfused

TORCH_LIBRARY_FRAGMENT(kdfused_emulated, m) {
  m.def(kdfused::kSparseShardStatsSchema);
  m.def(kdfused::kSparseShardMergeSchema);
  m.def(kdfused::kSparseShardGradSchema);
}

TORCH_LIBRARY_IMPL(kdfused_emulated, CPU, m) {
  m.impl("sparse_shard_stats", &kdfused::shard_stats_emulated);
  m.impl("sparse_shard_merge", &kdfused::shard_merge_emulated);
  m.impl("sparse_shard_grad", &kdfused::shard_grad_emulated);
}
