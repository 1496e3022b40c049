// The launches of the vocab-parallel kernels (parallel_kernel.cuh), through a
// launcher policy (launch.cuh): parallel_cuda.cu's, and the emulator's in
// tests/emulator/.
#pragma once

#include <ATen/core/Tensor.h>

#include "../parallel_op.h"
#include "distill_launch.cuh"
#include "launch.cuh"
#include "parallel_kernel.cuh"

namespace kdfused {
namespace cuda {

// The phases' shape: a block per row of the shard, threaded as the plain
// kernel's unsplit launch.
template <typename S, typename Tt>
Launch shard_launch(const DistillProblem& prob) {
  return Launch{prob.n, block_threads(prob.v, pack_width<S, Tt>(), 1)};
}

// out [N, 12]: each row's ShardStats over the shard at column `offset` of a
// vocabulary of `vocab` ids.
template <typename Launcher>
void launch_shard_stats(const Launcher& launcher, const DistillProblem& prob, int64_t offset,
                        int64_t vocab, const at::Tensor& out) {
  for_row_kernel(prob, [&](auto s_tag, auto t_tag, auto... rows) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    launcher.launch(shard_launch<S, Tt>(prob), &shard_stats_kernel<S, Tt>, rows..., prob.v, offset,
                    vocab, prob.params, out.data_ptr<float>());
  });
}

// out [N, 2]: the shard's JSD sums given the merged constants [N, 11].
template <typename Launcher>
void launch_shard_jsd(const Launcher& launcher, const DistillProblem& prob,
                      const at::Tensor& consts, const at::Tensor& out) {
  for_row_kernel(prob, [&](auto s_tag, auto t_tag, auto... rows) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    launcher.launch(shard_launch<S, Tt>(prob), &shard_jsd_kernel<S, Tt>, rows..., prob.v,
                    prob.params, consts.const_data_ptr<float>(), out.data_ptr<float>());
  });
}

// grad [N, V_r]: the shard's gradient given the merged constants [N, 11].
template <typename Launcher>
void launch_shard_grad(const Launcher& launcher, const DistillProblem& prob, int64_t offset,
                       const at::Tensor& consts, const at::Tensor& grad) {
  for_row_kernel(prob, [&](auto s_tag, auto t_tag, auto... rows) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    launcher.launch(shard_launch<S, Tt>(prob), &shard_grad_kernel<S, Tt>, rows...,
                    prob.grad_scale_data(), grad.data_ptr<S>(), prob.v, offset, prob.params,
                    consts.const_data_ptr<float>());
  });
}

// The merges' shape: a thread per row, in blocks of 256.
inline Launch merge_launch(int64_t n) { return Launch{(n + 255) / 256, 256}; }

// consts [N, 11], hard and soft [N] from the [W, N, 12] shard statistics.
template <typename Launcher>
void launch_merge(const Launcher& launcher, const at::Tensor& shard_stats,
                  const std::optional<at::Tensor>& labels, const LossParams& p,
                  double label_smoothing, const at::Tensor& consts, const at::Tensor& hard,
                  const at::Tensor& soft) {
  const int64_t w = shard_stats.size(0), n = shard_stats.size(1);
  if (n == 0) return;
  const ContiguousLabels y(labels);
  launcher.launch(merge_launch(n), &merge_kernel, n, w, shard_stats.const_data_ptr<float>(),
                  y.data(), p, label_smoothing, consts.data_ptr<float>(), hard.data_ptr<float>(),
                  soft.data_ptr<float>());
}

// JSD's constants (consts [N, 11], updated) and soft [N] from the [W, N, 2]
// shard sums.
template <typename Launcher>
void launch_jsd_finish(const Launcher& launcher, const at::Tensor& shard_sums,
                       const std::optional<at::Tensor>& labels, const LossParams& p,
                       const at::Tensor& consts, const at::Tensor& soft) {
  const int64_t w = shard_sums.size(0), n = shard_sums.size(1);
  if (n == 0) return;
  const ContiguousLabels y(labels);
  launcher.launch(merge_launch(n), &jsd_finish_kernel, n, w, shard_sums.const_data_ptr<float>(),
                  y.data(), p, consts.data_ptr<float>(), soft.data_ptr<float>());
}

}  // namespace cuda
}  // namespace kdfused
