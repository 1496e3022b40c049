// The sparse-teacher CUDA kernels' device code (the math is kdfused_math.h's),
// kept apart from their launcher (sparse_cuda.cu) so that tests/emulator/ runs
// it on the CPU too.
//
// sparse_rows_kernel, one block per row: the row's kept ids are marked in a
// bitmask in shared memory (a repeated or out-of-range id stops the kernel
// with a device-side assert, as a bad label does), then pass 1 streams the
// student row once (online softmax, the tail's sum kept apart by the mask),
// thread 0 takes the k + 1 buckets (sparse_buckets), and the gradient pass
// writes p_s h_g everywhere before the kept ids and the label are rewritten.
//
// topk_rows_kernel, one block per row: the row's log-normaliser and, by radix
// select on the logits' order-preserving bit keys (8 bits a sweep, the first
// sweep fused with the softmax's), the k-th largest key; then one sweep
// collects the larger keys and, in column order, as many equal ones as fit
// (ties to the lower id), and the k entries are ranked in shared memory.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>

#include "distill_kernel.cuh"

namespace kdfused {
namespace cuda {

#ifndef KDFUSED_EMULATED
// The launch's dynamic shared memory, as an array of Type.
#define KDFUSED_DYNAMIC_SHARED(Type, name)                           \
  extern __shared__ __align__(16) unsigned char kd_dynamic_shared[]; \
  Type* name = reinterpret_cast<Type*>(kd_dynamic_shared)
#endif

// Calls f(j, s, n) on consecutive runs of this thread's elements of one row
// (Row's loop for a single array): s are n floats from column j.
template <typename S, typename F>
__device__ void for_each_student(const S* s, int64_t v, F&& f) {
  constexpr int W = 16 / sizeof(S);
  const int64_t misaligned = (reinterpret_cast<uintptr_t>(s) / sizeof(S)) % W;
  int64_t head = misaligned == 0 ? 0 : W - misaligned;
  if (head >= v || !aligned_to(s + head, 16)) head = v;
  const int64_t body_end = head + (v - head) / W * W;
  for (int64_t j = head + threadIdx.x * W; j < body_end; j += blockDim.x * W) {
    const auto sp = *reinterpret_cast<const Pack<S, W>*>(s + j);
    float sf[W];
#pragma unroll
    for (int k = 0; k < W; ++k) sf[k] = static_cast<float>(sp.v[k]);
    f(j, sf, std::integral_constant<int, W>{});
  }
  const int64_t scalars = head + (v - body_end);
  for (int64_t k = threadIdx.x; k < scalars; k += blockDim.x) {
    const int64_t j = k < head ? k : body_end + (k - head);
    const float sf = static_cast<float>(s[j]);
    f(j, &sf, std::integral_constant<int, 1>{});
  }
}

// Bit j of a row's kept-id mask.
__device__ inline bool is_kept(const uint32_t* mask, int64_t j) {
  return (mask[j >> 5] >> (j & 31)) & 1u;
}

// The shared memory the sparse loss uses besides its dynamic part.
struct SparseShared {
  SparseStats stats[kMaxWarps];
  float sums[kMaxWarps];
  RowConsts consts;
  SparseRow row;
  int64_t kept;  // the row's kept (not padded) entries
};

// The dynamic part: the mask, then per entry of the row's teacher (k: the
// longest row) its id (int 32), the student's logit or log-prob there, its
// p_s, and the stored log-prob, or T dD/ds once the buckets are done.
C10_HOST_DEVICE inline int64_t mask_words(int64_t v) { return (v + 31) / 32; }
C10_HOST_DEVICE inline size_t sparse_shared_bytes(int64_t v, int64_t k) {
  return static_cast<size_t>(mask_words(v) + 4 * k) * 4;
}

template <typename S>
__global__ void __launch_bounds__(kMaxThreads, 2)
    sparse_rows_kernel(const S* __restrict__ student, int64_t s_stride,
                       const TeacherEntries teacher, const int64_t* __restrict__ labels,
                       const float* __restrict__ grad_scale, float* __restrict__ hard,
                       float* __restrict__ soft, S* __restrict__ grad, int64_t v,
                       const LossParams p, const Tail tail, const float st_over_t) {
  KDFUSED_BLOCK_SHARED(SparseShared, sh);
  KDFUSED_DYNAMIC_SHARED(uint32_t, mask);
  const int64_t i = blockIdx.x;
  const int64_t k = teacher.k;
  int32_t* ids = reinterpret_cast<int32_t*>(mask + mask_words(v));
  float* lb = reinterpret_cast<float*>(ids + k);
  float* ps = lb + k;
  float* x = ps + k;
  const int64_t first = teacher.row_begin(i);
  const int64_t len = teacher.row_end(i) - first;  // at most k
  const S* s = student + i * s_stride;
  S* g = grad ? grad + i * v : nullptr;
  const int64_t label = labels ? labels[i] : -1;
  if (labels && label == p.ignore_index) {
    if (threadIdx.x == 0) hard[i] = soft[i] = 0.f;
    if (g) {
      for (int64_t j = threadIdx.x; j < v; j += blockDim.x) g[j] = S(0.f);
    }
    return;
  }
  const bool label_ok = label_readable(labels != nullptr, label, i, v, p, true);

  // The kept ids: checked, marked, and their logits and log-probs gathered.
  for (int64_t w = threadIdx.x; w < mask_words(v); w += blockDim.x) mask[w] = 0u;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    const int64_t id = teacher.id(first + j);
    const bool ok = id >= -1 && id < v;
    if (!ok && !teacher.offsets) {
      printf(
          "kdfused: sparse teacher indices[%lld, %lld] = %lld is outside [0, V) with V = %lld "
          "(-1 pads a row)\n",
          static_cast<long long>(i), static_cast<long long>(j), static_cast<long long>(id),
          static_cast<long long>(v));
    } else if (!ok) {
      printf(
          "kdfused: sparse teacher indices[%lld] (row %lld, entry %lld) = %lld is outside [0, V) "
          "with V = %lld (-1 pads a row)\n",
          static_cast<long long>(first + j), static_cast<long long>(i), static_cast<long long>(j),
          static_cast<long long>(id), static_cast<long long>(v));
    }
    CUDA_KERNEL_ASSERT(ok);
    const bool use = ok && id >= 0;
    if (use) atomicOr(&mask[id >> 5], 1u << (id & 31));
    ids[j] = use ? static_cast<int32_t>(id) : -1;
    lb[j] = use ? static_cast<float>(s[id]) : 0.f;
    x[j] = teacher.logprob(first + j);
  }
  __syncthreads();
  // A repeated id, reported at its later entry whatever the threads' order.
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    bool distinct = true;
    for (int64_t q = 0; q < j && ids[j] >= 0; ++q) distinct = distinct && ids[q] != ids[j];
    if (!distinct && !teacher.offsets) {
      printf(
          "kdfused: sparse teacher indices[%lld, %lld] = %lld repeats an id kept earlier in its "
          "row: a row's kept ids must be distinct\n",
          static_cast<long long>(i), static_cast<long long>(j), static_cast<long long>(ids[j]));
    } else if (!distinct) {
      printf(
          "kdfused: sparse teacher indices[%lld] (row %lld, entry %lld) = %lld repeats an id kept "
          "earlier in its row: a row's kept ids must be distinct\n",
          static_cast<long long>(first + j), static_cast<long long>(i), static_cast<long long>(j),
          static_cast<long long>(ids[j]));
    }
    CUDA_KERNEL_ASSERT(distinct);
  }

  // Pass 1: the online softmax, the tail's sum apart.
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
  st = block_reduce(st, merge, sparse_empty(), sh.stats);
  if (threadIdx.x == 0) sh.consts = sparse_consts(st, p).c;
  __syncthreads();
  if (p.smoothing && labels != nullptr) {
    const float ms = sh.consts.ms;
    float sum = 0.f;
    for_each_student(s, v, [&](int64_t, const float* sf, auto n) {
#pragma unroll
      for (int e = 0; e < n; ++e) sum += smooth_term(sf[e], ms);
    });
    sum = block_reduce(sum, [](float a, float b) { return a + b; }, 0.f, sh.sums);
    if (threadIdx.x == 0) sh.consts.sum_below = sum;
    __syncthreads();
  }

  // The buckets, by one thread (k is small next to V).
  if (threadIdx.x == 0) {
    const SparseConsts sc = sparse_consts(st, p);
    RowConsts c = sh.consts;
    const float inv_zs = 1.f / st.zs;
    int64_t n = 0;
    for (int64_t j = 0; j < len; ++j) {
      if (ids[j] < 0) continue;
      ids[n] = ids[j];
      ps[n] = prob_s_ratio(lb[j], st.ms, p.inv_t, inv_zs);
      lb[n] = log_ps(lb[j], c, p);
      x[n] = x[j];
      ++n;
    }
    const SparseRow row = sparse_buckets(lb, x, n, sc.log_tail, n == v, tail, st_over_t, p, ps);
    sh.row = row;
    sh.kept = n;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    hard[i] = !labels ? 0.f : label_ok ? hard_loss(static_cast<float>(s[label]), c, p) : nan;
    soft[i] = p.soft_scale * row.div;
  }
  __syncthreads();
  if (!g) return;

  const RowConsts c = sh.consts;
  const float tail_coef = sh.row.tail_coef;
  const int64_t n = sh.kept;
  const GradCoefs gk = grad_coefs(p, grad_scale ? *grad_scale : 1.f);
  with_grad_variant(p, [&](auto variant) {
    using V = decltype(variant);
    const auto element = [&](float sv, float ps, float dd, bool is_label) {
      return combine_grad<V::kHasHard, V::kHasSoft, V::kHardQ, V::kSmoothed>(sv, ps, dd, is_label,
                                                                             c, gk);
    };
    for_each_student(s, v, [&](int64_t j, const float* sf, auto w) {
      Pack<S, decltype(w)::value> out;
#pragma unroll
      for (int e = 0; e < w; ++e) {
        const float ps = prob_s(sf[e], c, p);
        out.v[e] = static_cast<S>(element(sf[e], ps, ps * tail_coef, false));
      }
      // The gradient row's alignment is the student row's only when the
      // student's row stride is V: else its elements go one by one.
      if (decltype(w)::value == 1 || aligned_to(g + j, static_cast<int>(sizeof(out)))) {
        *reinterpret_cast<Pack<S, decltype(w)::value>*>(g + j) = out;
      } else {
#pragma unroll
        for (int e = 0; e < w; ++e) g[j + e] = out.v[e];
      }
    });
    __syncthreads();  // the kept ids and the label after the whole row
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const int64_t id = ids[j];
      g[id] = static_cast<S>(element(static_cast<float>(s[id]), ps[j], x[j], id == label));
    }
    if (threadIdx.x == 0 && labels && label_ok && !is_kept(mask, label)) {
      const float sy = static_cast<float>(s[label]);
      const float ps = prob_s(sy, c, p);
      g[label] = static_cast<S>(element(sy, ps, ps * tail_coef, true));
    }
  });
}

// ---- top-k -----------------------------------------------------------------

// A float's bits as a key whose unsigned order is the float order (NaN: 0,
// below every number, chosen only to fill a row with fewer than k numbers).
__device__ inline uint32_t order_key(float x) {
  if (x != x) return 0u;
#ifdef __CUDA_ARCH__
  const uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
// The largest k the kernel takes (its entries are ranked in shared memory);
// the Python layer sorts larger k with torch.
constexpr int64_t kMaxTopk = 2048;

struct TopkShared {
  uint32_t hist[kRadixBins];
  struct MZ {
    float m, z;
  } mz[kMaxWarps];
  uint32_t prefix;     // the k-th key's digits found so far
  int64_t remaining;   // how many of the keys with that prefix are still to take
  int64_t above;       // the keys above that prefix
  int64_t taken_gt;    // slots filled by keys above the k-th
  int64_t ties_taken;  // equal keys taken so far (column order)
  int64_t nan_taken;   // NaN entries taken (a row with fewer than k numbers)
  int32_t tie_slot[kMaxThreads];
};

template <typename S>
__global__ void __launch_bounds__(kMaxThreads)
    topk_rows_kernel(const S* __restrict__ logits, int64_t stride, int64_t v, int64_t k,
                     float inv_t, int64_t* __restrict__ out_idx, float* __restrict__ out_lp) {
  KDFUSED_BLOCK_SHARED(TopkShared, sh);
  KDFUSED_DYNAMIC_SHARED(float, entry_value);  // k values, then k ids (int64)
  int64_t* entry_id = reinterpret_cast<int64_t*>(entry_value + ((k + 1) / 2) * 2);
  const int64_t i = blockIdx.x;
  const S* row = logits + i * stride;

  // Sweep 1: the softmax's max and sum, and the top digit's histogram.
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) sh.hist[b] = 0u;
  __syncthreads();
  TopkShared::MZ mz{neg_inf(), 0.f};
  for_each_student(row, v, [&](int64_t, const float* xf, auto n) {
    float cm = mz.m;
#pragma unroll
    for (int e = 0; e < n; ++e) cm = ::fmaxf(cm, xf[e]);
    if (cm > mz.m) {
      mz.z *= shifted_exp(mz.m, cm, inv_t);
      mz.m = cm;
    }
#pragma unroll
    for (int e = 0; e < n; ++e) {
      mz.z += exp_affine(below(xf[e], mz.m), inv_t, 0.f);
      const uint32_t key = order_key(xf[e]);
      if (key != 0u) atomicAdd(&sh.hist[key >> (32 - kRadixBits)], 1u);
    }
  });
  const auto merge = [inv_t](const TopkShared::MZ& a, const TopkShared::MZ& b) {
    const float m = max_keep(a.m, b.m);
    return TopkShared::MZ{m, a.z * shifted_exp(a.m, m, inv_t) + b.z * shifted_exp(b.m, m, inv_t)};
  };
  mz = block_reduce(mz, merge, TopkShared::MZ{neg_inf(), 0.f}, sh.mz);
  if (threadIdx.x == 0) {
    sh.mz[0] = mz;
    sh.prefix = 0u;
    sh.remaining = k;
    sh.above = 0;
  }
  __syncthreads();

  // The k-th largest key, 8 bits at a time: the bin where the count from the
  // top reaches the keys still to take.
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    if (shift != 32 - kRadixBits) {
      for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) sh.hist[b] = 0u;
      __syncthreads();
      const uint32_t prefix = sh.prefix;
      const int high = shift + kRadixBits;  // the bits already fixed
      for_each_student(row, v, [&](int64_t, const float* xf, auto n) {
#pragma unroll
        for (int e = 0; e < n; ++e) {
          const uint32_t key = order_key(xf[e]);
          if (key != 0u && (key >> high) == (prefix >> high)) {
            atomicAdd(&sh.hist[(key >> shift) & (kRadixBins - 1)], 1u);
          }
        }
      });
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int b = kRadixBins - 1;
      for (; b > 0 && above + sh.hist[b] < sh.remaining; --b) above += sh.hist[b];
      sh.prefix |= static_cast<uint32_t>(b) << shift;
      sh.remaining -= above;
      sh.above += above;
    }
    __syncthreads();
  }
  // Keys above the k-th fill slots in any order; the rest are equal to it.
  const uint32_t kth = sh.prefix;
  const int64_t ties = sh.remaining;
  if (threadIdx.x == 0) {
    sh.taken_gt = 0;
    sh.ties_taken = 0;
    sh.nan_taken = 0;
  }
  __syncthreads();
  const int64_t take_gt = sh.above;  // the keys above the k-th: their slots come first
  // Column tiles of blockDim elements: equal keys ranked in column order.
  for (int64_t t0 = 0; t0 < v; t0 += blockDim.x) {
    const int64_t j = t0 + threadIdx.x;
    const float xf = j < v ? static_cast<float>(row[j]) : 0.f;
    const uint32_t key = j < v ? order_key(xf) : 0u;
    if (key != 0u && key > kth) {
      const int64_t slot = atomicAdd(reinterpret_cast<unsigned long long*>(&sh.taken_gt), 1ull);
      entry_value[slot] = xf;
      entry_id[slot] = j;
    }
    const bool tie = key != 0u && key == kth;
    sh.tie_slot[threadIdx.x] = tie ? 1 : 0;
    // Ties are few: the tiles that hold one are scanned by one thread.
    if (__syncthreads_or(tie)) {
      if (threadIdx.x == 0) {
        int64_t taken = sh.ties_taken;
        for (unsigned u = 0; u < blockDim.x; ++u) {
          const bool take = sh.tie_slot[u] != 0 && taken < ties;
          sh.tie_slot[u] = take ? static_cast<int32_t>(take_gt + taken) : -1;
          taken += take ? 1 : 0;
        }
        sh.ties_taken = taken;
      }
      __syncthreads();
      if (tie && sh.tie_slot[threadIdx.x] >= 0) {
        entry_value[sh.tie_slot[threadIdx.x]] = xf;
        entry_id[sh.tie_slot[threadIdx.x]] = j;
      }
    }
    __syncthreads();
  }
  // Slots left when the row has fewer than k numbers: its NaN ids, lowest
  // first, in column tiles as the ties (rare rows, so one thread scans).
  const int64_t numbers = sh.taken_gt + sh.ties_taken;
  if (numbers < k) {
    for (int64_t t0 = 0; t0 < v; t0 += blockDim.x) {
      const int64_t j = t0 + threadIdx.x;
      const bool nan = j < v && order_key(static_cast<float>(row[j])) == 0u;
      sh.tie_slot[threadIdx.x] = nan ? 1 : 0;
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t taken = sh.nan_taken;
        for (unsigned u = 0; u < blockDim.x; ++u) {
          const bool take = sh.tie_slot[u] != 0 && numbers + taken < k;
          sh.tie_slot[u] = take ? static_cast<int32_t>(numbers + taken) : -1;
          taken += take ? 1 : 0;
        }
        sh.nan_taken = taken;
      }
      __syncthreads();
      if (nan && sh.tie_slot[threadIdx.x] >= 0) {
        entry_value[sh.tie_slot[threadIdx.x]] = static_cast<float>(row[j]);
        entry_id[sh.tie_slot[threadIdx.x]] = j;
      }
      __syncthreads();
    }
  }
  const int64_t filled = numbers + sh.nan_taken;  // k, as the row has V >= k entries
  // Each number's rank: the numbers better than it (larger, or equal and a
  // lower id); the NaN entries keep their slots, after the numbers. A row
  // with a NaN has log_z NaN, so NaN log-probs throughout.
  const float log_z = ::logf(sh.mz[0].z);
  const float m = sh.mz[0].m;
  for (int64_t a = numbers + threadIdx.x; a < filled; a += blockDim.x) {
    out_idx[i * k + a] = entry_id[a];
    out_lp[i * k + a] = below(entry_value[a], m) * inv_t - log_z;
  }
  for (int64_t a = threadIdx.x; a < numbers; a += blockDim.x) {
    const float va = entry_value[a];
    const int64_t ia = entry_id[a];
    int64_t rank = 0;
    for (int64_t b = 0; b < numbers; ++b) {
      const float vb = entry_value[b];
      rank += (vb > va || (vb == va && entry_id[b] < ia)) ? 1 : 0;
    }
    out_idx[i * k + rank] = ia;
    out_lp[i * k + rank] = below(va, m) * inv_t - log_z;
  }
  for (int64_t a = filled + threadIdx.x; a < k; a += blockDim.x) {
    out_idx[i * k + a] = -1;
    out_lp[i * k + a] = neg_inf();
  }
}

C10_HOST_DEVICE inline size_t topk_shared_bytes(int64_t k) {
  return static_cast<size_t>((k + 1) / 2 * 2) * sizeof(float) + static_cast<size_t>(k) * 8;
}

}  // namespace cuda
}  // namespace kdfused
