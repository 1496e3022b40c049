// The launches of the sparse teacher's vocab-parallel kernels
// (sparse_shard_kernel.cuh), through a launcher policy (launch.cuh):
// sparse_shard_cuda.cu's, and the emulator's in tests/emulator/.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "../sparse_shard_op.h"
#include "launch.cuh"
#include "sparse_launch.cuh"
#include "sparse_shard_kernel.cuh"

namespace kdfused {
namespace cuda {

// out [N, 8 + k]: each row's SparseShardStats over the shard at column
// `offset` of a vocabulary of `vocab` ids, and the logits at its kept ids.
template <typename Launcher>
void launch_sparse_shard_stats(const Launcher& launcher, const SparseProblem& prob, int64_t offset,
                               int64_t vocab, const at::Tensor& out) {
  const DistillProblem& base = prob.base;
  if (base.n == 0) return;
  const size_t shared = shard_stats_shared_bytes(base.v);
  KDFUSED_DISPATCH_LOGITS(base.student.scalar_type(), "kdfused_sparse_shard_stats", [&] {
    const auto kernel = &sparse_shard_stats_kernel<scalar_t>;
    launcher.allow_shared(kernel, shared, "the sparse teacher's shard statistics at this V_r");
    launcher.launch(row_launch<scalar_t>(base.n, base.v, shared), kernel,
                    base.student.const_data_ptr<scalar_t>(), base.student.stride(0),
                    prob.indices.const_data_ptr<int64_t>(), prob.k, base.label_data(), base.v,
                    offset, vocab, base.params, out.data_ptr<float>());
  });
}

// grad [N, V_r]: the shard's gradient given the merged rows [N, 12 + k].
template <typename Launcher>
void launch_sparse_shard_grad(const Launcher& launcher, const SparseProblem& prob, int64_t offset,
                              const at::Tensor& merged, const at::Tensor& grad) {
  const DistillProblem& base = prob.base;
  if (base.n == 0) return;
  KDFUSED_DISPATCH_LOGITS(base.student.scalar_type(), "kdfused_sparse_shard_grad", [&] {
    launcher.launch(row_launch<scalar_t>(base.n, base.v, 0), &sparse_shard_grad_kernel<scalar_t>,
                    base.student.const_data_ptr<scalar_t>(), base.student.stride(0),
                    prob.indices.const_data_ptr<int64_t>(), prob.k, base.label_data(),
                    base.grad_scale_data(), grad.data_ptr<scalar_t>(), base.v, offset, base.params,
                    merged.const_data_ptr<float>());
  });
}

// The merge's shape: a thread per row, in blocks of 256 (parallel_launch.cuh's
// merges' shape; that header's kernels are not templates, so a second
// translation unit may not include it).
inline Launch sparse_merge_launch(int64_t n) { return Launch{(n + 255) / 256, 256}; }

// merged [N, 12 + k], hard and soft [N] from the [W, N, 8 + k] shard
// statistics; scratch: [N, k] float32 for the kept ids' log p_s.
template <typename Launcher>
void launch_sparse_shard_merge(const Launcher& launcher, const at::Tensor& shard_stats,
                               const SparseMergeProblem& prob,
                               const std::optional<at::Tensor>& labels, double label_smoothing,
                               const at::Tensor& scratch, const at::Tensor& merged,
                               const at::Tensor& hard, const at::Tensor& soft) {
  if (prob.n == 0) return;
  const ContiguousLabels y(labels);
  launcher.launch(sparse_merge_launch(prob.n), &sparse_shard_merge_kernel, prob.n, prob.w, prob.k,
                  shard_stats.const_data_ptr<float>(), prob.indices.const_data_ptr<int64_t>(),
                  prob.logprobs.const_data_ptr<float>(), y.data(), prob.params, label_smoothing,
                  prob.tail, prob.st_over_t, scratch.data_ptr<float>(), merged.data_ptr<float>(),
                  hard.data_ptr<float>(), soft.data_ptr<float>());
}

}  // namespace cuda
}  // namespace kdfused
