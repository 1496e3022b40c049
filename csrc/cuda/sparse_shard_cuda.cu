// The CUDA ops of the sparse teacher's vocab-parallel phases: checks, outputs
// and the launches (sparse_shard_launch.cuh) on the current stream (device
// code: sparse_shard_kernel.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "../sparse_shard_op.h"
#include "cuda_launcher.cuh"
#include "sparse_shard_launch.cuh"

namespace kdfused {
namespace {

SparseProblem cuda_sparse_shard(KDFUSED_SPARSE_PHASE_ARGS) {
  SparseProblem prob = prepare_sparse_shard(KDFUSED_SPARSE_PHASE_NAMES, c10::DeviceType::CUDA);
  check_row_count(prob.base.n);
  return prob;
}

}  // namespace

at::Tensor sparse_shard_stats_cuda(KDFUSED_SPARSE_PHASE_ARGS) {
  const SparseProblem prob = cuda_sparse_shard(KDFUSED_SPARSE_PHASE_NAMES);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor out = at::empty({prob.base.n, kSparseStatsFields + prob.k},
                             prob.base.student.options().dtype(at::kFloat));
  cuda::launch_sparse_shard_stats(cuda::CudaLauncher{}, prob, column_offset, vocab, out);
  return out;
}

at::Tensor sparse_shard_grad_cuda(KDFUSED_SPARSE_PHASE_ARGS, const at::Tensor& merged) {
  const SparseProblem prob = cuda_sparse_shard(KDFUSED_SPARSE_PHASE_NAMES);
  check_merged(merged, prob);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad = at::empty({prob.base.n, prob.base.v}, prob.base.student.options());
  cuda::launch_sparse_shard_grad(cuda::CudaLauncher{}, prob, column_offset, merged, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_shard_merge_cuda(KDFUSED_SPARSE_MERGE_ARGS) {
  const SparseMergeProblem prob = prepare_sparse_merge(
      shard_stats, indices, logprobs, labels, temperature, store_temperature, tail, alpha,
      divergence, beta, ignore_index, scale_by_t2, label_smoothing, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(shard_stats.device());
  const auto opts = shard_stats.options();
  at::Tensor merged = at::empty({prob.n, kSparseMergedFields + prob.k}, opts);
  at::Tensor hard = at::empty({prob.n}, opts), soft = at::empty({prob.n}, opts);
  at::Tensor scratch = at::empty({prob.n, prob.k}, opts);
  cuda::launch_sparse_shard_merge(cuda::CudaLauncher{}, shard_stats, prob, labels, label_smoothing,
                                  scratch, merged, hard, soft);
  return {merged, hard, soft};
}

}  // namespace kdfused
