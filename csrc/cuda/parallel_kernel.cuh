// The vocab-parallel phases' device code (parallel_op.h): one block per row of
// a rank's shard for the statistics, JSD's sums and the gradient (the plain
// kernel's passes, distill_kernel.cuh, split at the points where the ranks
// exchange per-row statistics), and one thread per row for the merges.
#pragma once

#include "../parallel_op.h"
#include "distill_kernel.cuh"

namespace kdfused {
namespace cuda {

struct PhaseShared {
  RowStats stats[kMaxWarps];
  JsdSums jsd[kMaxWarps];
  float sums[kMaxWarps];
  float ms;
};

template <typename S, typename Tt>
__global__ void __launch_bounds__(kMaxThreads)
    shard_stats_kernel(const S* __restrict__ student, const Tt* __restrict__ teacher,
                       int64_t s_stride, int64_t t_stride, const int64_t* __restrict__ labels,
                       int64_t v, int64_t offset, int64_t vocab, const LossParams p,
                       float* __restrict__ out) {
  KDFUSED_BLOCK_SHARED(PhaseShared, sh);
  const int64_t i = blockIdx.x;
  const int64_t label = labels ? labels[i] : -1;
  ShardStats o;
  o.st = stats_empty();
  o.sum_below = o.s_label = o.has_label = 0.f;
  o.columns = static_cast<float>(v);
  auto* row_out = reinterpret_cast<ShardStats*>(out) + i;
  if (labels && label == p.ignore_index) {
    if (threadIdx.x == 0) *row_out = o;
    return;
  }
  label_readable(labels != nullptr, label, i, vocab, p, true);
  const Row<S, Tt> row(student + i * s_stride, teacher + i * t_stride, nullptr, v);
  const auto merge = [&p](const RowStats& a, const RowStats& b) {
    return stats_merge(a, b, p.inv_t);
  };
  o.st = block_reduce(thread_stats(row, p), merge, stats_empty(), sh.stats);
  if (threadIdx.x == 0) sh.ms = o.st.ms;
  __syncthreads();
  if (p.smoothing && labels) {
    const auto add = [](float a, float b) { return a + b; };
    o.sum_below = block_reduce(thread_sum_below(row, sh.ms), add, 0.f, sh.sums);
  }
  if (threadIdx.x == 0) {
    if (labels && label >= offset && label < offset + v) {
      o.s_label = static_cast<float>(student[i * s_stride + (label - offset)]);
      o.has_label = 1.f;
    }
    *row_out = o;
  }
}

template <typename S, typename Tt>
__global__ void __launch_bounds__(kMaxThreads)
    shard_jsd_kernel(const S* __restrict__ student, const Tt* __restrict__ teacher,
                     int64_t s_stride, int64_t t_stride, const int64_t* __restrict__ labels,
                     int64_t v, const LossParams p, const float* __restrict__ consts,
                     float* __restrict__ out) {
  KDFUSED_BLOCK_SHARED(PhaseShared, sh);
  const int64_t i = blockIdx.x;
  if (labels && labels[i] == p.ignore_index) {
    if (threadIdx.x == 0) out[2 * i] = out[2 * i + 1] = 0.f;
    return;
  }
  const RowConsts c = reinterpret_cast<const RowConsts*>(consts)[i];
  const Row<S, Tt> row(student + i * s_stride, teacher + i * t_stride, nullptr, v);
  JsdSums acc{0.f, 0.f};
  row.for_each([&](int64_t, const float* s, const float* t, auto n) {
#pragma unroll
    for (int k = 0; k < n; ++k) jsd_accumulate(acc, s[k], t[k], c, p);
  });
  const auto merge = [](const JsdSums& a, const JsdSums& b) { return jsd_merge(a, b); };
  acc = block_reduce(acc, merge, JsdSums{0.f, 0.f}, sh.jsd);
  if (threadIdx.x == 0) {
    out[2 * i] = acc.kl_tm;
    out[2 * i + 1] = acc.kl_sm;
  }
}

template <typename S, typename Tt>
__global__ void __launch_bounds__(kMaxThreads)
    shard_grad_kernel(const S* __restrict__ student, const Tt* __restrict__ teacher,
                      int64_t s_stride, int64_t t_stride, const int64_t* __restrict__ labels,
                      const float* __restrict__ grad_scale, S* __restrict__ grad, int64_t v,
                      int64_t offset, const LossParams p, const float* __restrict__ consts) {
  const int64_t i = blockIdx.x;
  const Row<S, Tt> row(student + i * s_stride, teacher + i * t_stride, grad + i * v, v);
  const int64_t label = labels ? labels[i] : -1;
  if (labels && label == p.ignore_index) {
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) grad[i * v + j] = S(0.f);
    return;
  }
  const RowConsts c = reinterpret_cast<const RowConsts*>(consts)[i];
  const GradCoefs gk = grad_coefs(p, grad_scale ? *grad_scale : 1.f);
  with_grad_variant(p, [&](auto variant) {
    using Variant = decltype(variant);
    row.for_each([&](int64_t j, const float* s, const float* t, auto n) {
      Pack<S, decltype(n)::value> out;
#pragma unroll
      for (int k = 0; k < n; ++k) {
        out.v[k] = static_cast<S>(Variant::element(s[k], t[k], false, c, p, gk));
      }
      *reinterpret_cast<Pack<S, decltype(n)::value>*>(row.g + j) = out;
    });
    __syncthreads();  // the label's element after the whole row
    if (threadIdx.x == 0 && labels && label >= offset && label < offset + v) {
      const int64_t j = label - offset;
      grad[i * v + j] = static_cast<S>(
          Variant::element(static_cast<float>(student[i * s_stride + j]),
                           static_cast<float>(teacher[i * t_stride + j]), true, c, p, gk));
    }
  });
}

__global__ void merge_kernel(int64_t n, int64_t w, const float* __restrict__ stats,
                             const int64_t* __restrict__ labels, const LossParams p,
                             double label_smoothing, float* __restrict__ consts,
                             float* __restrict__ hard, float* __restrict__ soft) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) merge_row(i, n, w, stats, labels, p, label_smoothing, consts, hard, soft);
}

__global__ void jsd_finish_kernel(int64_t n, int64_t w, const float* __restrict__ sums,
                                  const int64_t* __restrict__ labels, const LossParams p,
                                  float* __restrict__ consts, float* __restrict__ soft) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) jsd_finish_row(i, n, w, sums, labels, p, consts, soft);
}

}  // namespace cuda
}  // namespace kdfused
