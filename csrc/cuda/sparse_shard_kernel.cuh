// The sparse teacher's vocab-parallel phases' device code (sparse_shard_op.h):
// sparse_rows_kernel (sparse_kernel.cuh) split at the exchange. One block per
// row of a rank's shard for the statistics (the kept ids this shard holds
// marked in a shared-memory bitmask, pass 1's online softmax with the tail's
// sum apart) and for the gradient (p_s h_g everywhere, then the kept ids and
// the label rewritten); one thread per row for the merge.
#pragma once

#include "../sparse_shard_op.h"
#include "sparse_kernel.cuh"

namespace kdfused {
namespace cuda {

struct SparseShardShared {
  SparseStats stats[kMaxWarps];
  float sums[kMaxWarps];
  float ms;
};

// The dynamic shared memory of the statistics kernel: the shard's kept-id mask.
C10_HOST_DEVICE inline size_t shard_stats_shared_bytes(int64_t v) {
  return static_cast<size_t>(mask_words(v)) * 4;
}

// A kept id's column in the shard [offset, offset + v), or -1.
__device__ inline int64_t shard_column(int64_t id, int64_t offset, int64_t v) {
  return id >= 0 && id >= offset && id < offset + v ? id - offset : -1;
}

template <typename S>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_shard_stats_kernel(const S* __restrict__ student, int64_t s_stride,
                              const int64_t* __restrict__ indices, int64_t k,
                              const int64_t* __restrict__ labels, int64_t v, int64_t offset,
                              int64_t vocab, const LossParams p, float* __restrict__ out) {
  KDFUSED_BLOCK_SHARED(SparseShardShared, sh);
  KDFUSED_DYNAMIC_SHARED(uint32_t, mask);
  const int64_t i = blockIdx.x;
  const S* s = student + i * s_stride;
  const int64_t* ids = indices + i * k;
  float* row = out + i * (kSparseStatsFields + k);
  float* kept_s = row + kSparseStatsFields;
  const int64_t label = labels ? labels[i] : -1;
  SparseShardStats o;
  o.st = sparse_empty();
  o.sum_below = o.s_label = o.has_label = 0.f;
  o.columns = static_cast<float>(v);
  if (labels && label == p.ignore_index) {
    if (threadIdx.x == 0) *reinterpret_cast<SparseShardStats*>(row) = o;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) kept_s[j] = 0.f;
    return;
  }
  label_readable(labels != nullptr, label, i, vocab, p, true);

  for (int64_t w = threadIdx.x; w < mask_words(v); w += blockDim.x) mask[w] = 0u;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    const int64_t at = shard_column(ids[j], offset, v);
    if (at >= 0) atomicOr(&mask[at >> 5], 1u << (at & 31));
    kept_s[j] = at >= 0 ? static_cast<float>(s[at]) : 0.f;
  }
  __syncthreads();

  SparseStats st = sparse_empty();
  with_z1(z1_mode(p), [&](auto z1_how) {
    for_each_student(s, v, [&](int64_t j, const float* sf, auto n) {
      float m = st.ms;
#pragma unroll
      for (int e = 0; e < n; ++e) m = ::fmaxf(m, sf[e]);
      sparse_rescale(st, m, p.inv_t);
      const bool finite = std::isfinite(st.ms);
#pragma unroll
      for (int e = 0; e < n; ++e) {
        const float tail_weight = is_kept(mask, j + e) ? 0.f : 1.f;
        sparse_accumulate(sf[e], tail_weight, st.ms, p.inv_t, z1_how, st.zs, st.ztail, st.z1,
                          finite);
      }
    });
  });
  const auto merge = [&p](const SparseStats& a, const SparseStats& b) {
    return sparse_merge(a, b, p.inv_t);
  };
  o.st = block_reduce(st, merge, sparse_empty(), sh.stats);
  if (threadIdx.x == 0) sh.ms = o.st.ms;
  __syncthreads();
  if (p.smoothing && labels) {
    const float ms = sh.ms;
    float sum = 0.f;
    for_each_student(s, v, [&](int64_t, const float* sf, auto n) {
#pragma unroll
      for (int e = 0; e < n; ++e) sum += smooth_term(sf[e], ms);
    });
    o.sum_below = block_reduce(sum, [](float a, float b) { return a + b; }, 0.f, sh.sums);
  }
  if (threadIdx.x == 0) {
    if (labels && label >= offset && label < offset + v) {
      o.s_label = static_cast<float>(s[label - offset]);
      o.has_label = 1.f;
    }
    *reinterpret_cast<SparseShardStats*>(row) = o;
  }
}

// for_each_student over s for a loop that also stores packs at the same
// columns of g: packs only when g lies at s's offset within 16 bytes (a
// shard's row of a wider buffer need not), else every element one by one.
template <typename S, typename F>
__device__ void for_each_student_into(const S* s, const S* g, int64_t v, F&& f) {
  if (reinterpret_cast<uintptr_t>(s) % 16 == reinterpret_cast<uintptr_t>(g) % 16) {
    for_each_student(s, v, f);
    return;
  }
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const float sf = static_cast<float>(s[j]);
    f(j, &sf, std::integral_constant<int, 1>{});
  }
}

template <typename S>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_shard_grad_kernel(const S* __restrict__ student, int64_t s_stride,
                             const int64_t* __restrict__ indices, int64_t k,
                             const int64_t* __restrict__ labels,
                             const float* __restrict__ grad_scale, S* __restrict__ grad, int64_t v,
                             int64_t offset, const LossParams p, const float* __restrict__ merged) {
  const int64_t i = blockIdx.x;
  const S* s = student + i * s_stride;
  S* g = grad + i * v;
  const int64_t* ids = indices + i * k;
  const int64_t label = labels ? labels[i] : -1;
  if (labels && label == p.ignore_index) {
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) g[j] = S(0.f);
    return;
  }
  const float* row = merged + i * (kSparseMergedFields + k);
  const RowConsts c = *reinterpret_cast<const RowConsts*>(row);
  const float tail_coef = row[kSparseMergedFields - 1];
  const float* x = row + kSparseMergedFields;
  const GradCoefs gk = grad_coefs(p, grad_scale ? *grad_scale : 1.f);
  with_grad_variant(p, [&](auto variant) {
    using V = decltype(variant);
    const auto element = [&](float sv, float ps, float dd, bool is_label) {
      return combine_grad<V::kHasHard, V::kHasSoft, V::kHardQ, V::kSmoothed>(sv, ps, dd, is_label,
                                                                             c, gk);
    };
    for_each_student_into(s, g, v, [&](int64_t j, const float* sf, auto w) {
      Pack<S, decltype(w)::value> out;
#pragma unroll
      for (int e = 0; e < w; ++e) {
        const float ps = prob_s(sf[e], c, p);
        out.v[e] = static_cast<S>(element(sf[e], ps, ps * tail_coef, false));
      }
      *reinterpret_cast<Pack<S, decltype(w)::value>*>(g + j) = out;
    });
    __syncthreads();  // the kept ids and the label after the whole row
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const int64_t at = shard_column(ids[j], offset, v);
      if (at < 0) continue;
      const float sv = static_cast<float>(s[at]);
      g[at] = static_cast<S>(element(sv, ::expf(log_ps(sv, c, p)), x[j], ids[j] == label));
    }
    const int64_t at = labels ? shard_column(label, offset, v) : -1;
    if (threadIdx.x == 0 && at >= 0) {
      bool kept = false;
      for (int64_t j = 0; j < k; ++j) kept = kept || ids[j] == label;
      if (!kept) {
        const float sy = static_cast<float>(s[at]);
        const float ps = prob_s(sy, c, p);
        g[at] = static_cast<S>(element(sy, ps, ps * tail_coef, true));
      }
    }
  });
}

// A thread per row: its kept ids and label checked against the whole
// vocabulary (a device-side assert, as sparse_rows_kernel's), then merged.
__global__ void sparse_shard_merge_kernel(
    int64_t n, int64_t w, int64_t k, const float* __restrict__ stats,
    const int64_t* __restrict__ indices, const float* __restrict__ logprobs,
    const int64_t* __restrict__ labels, const LossParams p, double label_smoothing, const Tail tail,
    const float st_over_t, float* __restrict__ scratch, float* __restrict__ merged,
    float* __restrict__ hard, float* __restrict__ soft) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t v = sparse_row_vocab(stats, i, n, w, k);
  const int64_t* ids = indices + i * k;
  bool ok = true;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t id = ids[j];
    const bool in_range = id >= -1 && id < v;
    if (!in_range) {
      printf(
          "kdfused: sparse teacher indices[%lld, %lld] = %lld is outside [0, V) with V = %lld "
          "(-1 pads a row)\n",
          static_cast<long long>(i), static_cast<long long>(j), static_cast<long long>(id),
          static_cast<long long>(v));
    }
    CUDA_KERNEL_ASSERT(in_range);
    bool distinct = true;
    for (int64_t q = 0; q < j && id >= 0; ++q) distinct = distinct && ids[q] != id;
    if (!distinct) {
      printf(
          "kdfused: sparse teacher indices[%lld, %lld] = %lld repeats an id kept earlier in its "
          "row: a row's kept ids must be distinct\n",
          static_cast<long long>(i), static_cast<long long>(j), static_cast<long long>(id));
    }
    CUDA_KERNEL_ASSERT(distinct);
    ok = ok && in_range && distinct;
  }
  if (labels && labels[i] != p.ignore_index) {
    const int64_t label = labels[i];
    const bool label_ok = label >= 0 && label < v;
    if (!label_ok) {
      printf(
          "kdfused: labels[%lld] = %lld is outside [0, V) with V = %lld and is not "
          "ignore_index = %lld\n",
          static_cast<long long>(i), static_cast<long long>(label), static_cast<long long>(v),
          static_cast<long long>(p.ignore_index));
    }
    CUDA_KERNEL_ASSERT(label_ok);
    ok = ok && label_ok;
  }
  if (!ok) return;
  sparse_merge_row(i, n, w, k, stats, indices, logprobs, labels, p, label_smoothing, tail,
                   st_over_t, scratch + i * k, merged, hard, soft);
}

}  // namespace cuda
}  // namespace kdfused
