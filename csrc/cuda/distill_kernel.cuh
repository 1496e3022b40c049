// The CUDA kernel's device code (the math is kdfused_math.h's): one block
// per row; each thread streams its share of the row in 16-byte packs (scalar
// head and tail where the row is not aligned) once per pass: statistics, JSD's
// sums (JSD only), gradient. Per-thread online-softmax states are merged in a
// fixed order (warp shuffles, then one warp), so results are bit-identical run
// to run. All accumulation is float32.
//
// Each row is read twice (three times for JSD): 10 bytes per bf16 element
// instead of the 6-byte floor (notes/gpu-tuning.md has the measurements and
// what was tried against that).
//
// Kept apart from the launcher (distill_cuda.cu) so that the CPU-only test
// suite can also run this code, under tests/emulator/ (a thread per CUDA thread).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <type_traits>

#include "../kdfused_math.h"

namespace kdfused {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// W elements of type T moved by one 16-byte (or narrower) memory instruction.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

// Elements per pack: 16 bytes of the wider of the two logits dtypes.
template <typename S, typename Tt>
constexpr int pack_width() {
  return 16 / (sizeof(S) > sizeof(Tt) ? sizeof(S) : sizeof(Tt));
}

template <typename T>
__device__ bool aligned_to(const T* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// One row split into a scalar head [0, head), packs [head, body_end) and a
// scalar tail [body_end, v). The packs are used only where the student, the
// teacher and the gradient rows all reach pack alignment at the same element
// (offset views can break that; then the whole row is scalar).
template <typename S, typename Tt>
struct Row {
  static constexpr int W = pack_width<S, Tt>();
  const S* s;
  const Tt* t;
  S* g;  // nullptr when no gradient is written
  int64_t v, head, body_end;

  __device__ Row(const S* s_, const Tt* t_, S* g_, int64_t v_) : s(s_), t(t_), g(g_), v(v_) {
    const int64_t misaligned = (reinterpret_cast<uintptr_t>(s) / sizeof(S)) % W;
    head = misaligned == 0 ? 0 : W - misaligned;
    const bool packs = head < v && aligned_to(s + head, sizeof(S) * W) &&
                       aligned_to(t + head, sizeof(Tt) * W) &&
                       (g == nullptr || aligned_to(g + head, sizeof(S) * W));
    if (!packs) head = v;
    body_end = head + (v - head) / W * W;
  }

  // Calls f(j, s, t, n) on consecutive runs of this thread's elements: s, t
  // are n floats from column j, n an integral_constant (W for packs, else 1).
  // kReverse: the packs last to first, so that a pass right after another
  // starts on what that one read last, the part of the row most likely still
  // in L2.
  template <bool kReverse = false, typename F>
  __device__ void for_each(F&& f) const {
    const int64_t step = blockDim.x;
    const auto pack = [&](int64_t j) {
      const auto sp = *reinterpret_cast<const Pack<S, W>*>(s + j);
      const auto tp = *reinterpret_cast<const Pack<Tt, W>*>(t + j);
      float sf[W], tf[W];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        sf[k] = static_cast<float>(sp.v[k]);
        tf[k] = static_cast<float>(tp.v[k]);
      }
      f(j, sf, tf, std::integral_constant<int, W>{});
    };
    if constexpr (kReverse) {
      const int64_t packs = (body_end - head) / W;
      if (threadIdx.x < packs) {
        for (int64_t m = (packs - 1 - threadIdx.x) / step; m >= 0; --m) {
          pack(head + (threadIdx.x + m * step) * W);
        }
      }
    } else {
      for (int64_t j = head + threadIdx.x * W; j < body_end; j += step * W) pack(j);
    }
    // The head and the tail as one range of scalar indices.
    const int64_t scalars = head + (v - body_end);
    for (int64_t k = threadIdx.x; k < scalars; k += step) {
      const int64_t j = k < head ? k : body_end + (k - head);
      const float sf = static_cast<float>(s[j]);
      const float tf = static_cast<float>(t[j]);
      f(j, &sf, &tf, std::integral_constant<int, 1>{});
    }
  }
};

// Shuffles a struct of floats down the warp, field by field (through a float
// view of a local copy: a memcpy version kept the struct in local memory).
template <typename T>
__device__ T shfl_down(const T& x, int delta) {
  static_assert(sizeof(T) % sizeof(float) == 0, "a struct of floats");
  T out = x;
  float* f = reinterpret_cast<float*>(&out);
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(T) / sizeof(float)); ++k) {
    f[k] = __shfl_down_sync(0xffffffffu, f[k], delta);
  }
  return out;
}

// Reduces x over the block in a fixed tree (deterministic); the result is
// valid in thread 0 only. smem holds kMaxWarps partials; identity pads them.
template <typename T, typename Merge>
__device__ T block_reduce(T x, Merge merge, const T& identity, T* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int d = kWarpSize / 2; d > 0; d /= 2) x = merge(x, shfl_down(x, d));
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x / kWarpSize) ? smem[lane] : identity;
    for (int d = kWarpSize / 2; d > 0; d /= 2) x = merge(x, shfl_down(x, d));
  }
  __syncthreads();  // smem is free again
  return x;
}

// Whether a row's label may be read (true without labels). A label outside
// [0, V) is never read: it stops the kernel with a device-side assert, which
// the host raises at its next synchronisation; thread 0 prints it first.
__device__ inline bool label_readable(bool has_labels, int64_t label, int64_t i, int64_t v,
                                      const LossParams& p) {
  const bool label_ok = !has_labels || (label >= 0 && label < v);
  if (!label_ok && threadIdx.x == 0) {
    printf(
        "kdfused: labels[%lld] = %lld is outside [0, V) with V = %lld and is not "
        "ignore_index = %lld\n",
        static_cast<long long>(i), static_cast<long long>(label), static_cast<long long>(v),
        static_cast<long long>(p.ignore_index));
    CUDA_KERNEL_ASSERT(label_ok);
  }
  return label_ok;
}

// Row i's two loss terms, once its constants are complete (NaN hard term for
// an unreadable label).
template <typename S>
__device__ void write_row_losses(float* hard, float* soft, int64_t i, const S* s_row,
                                 bool has_labels, int64_t label, bool label_ok, const RowConsts& c,
                                 const LossParams& p) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  hard[i] = !has_labels ? 0.f : label_ok ? hard_loss(static_cast<float>(s_row[label]), c) : nan;
  soft[i] = p.soft_scale * c.div;
}

// Calls f(std::integral_constant<Z1, ...>) for the run-time z1 mode.
template <typename F>
__device__ void with_z1(Z1 how, F&& f) {
  if (how == Z1::kSquare) return f(std::integral_constant<Z1, Z1::kSquare>{});
  if (how == Z1::kExp) return f(std::integral_constant<Z1, Z1::kExp>{});
  f(std::integral_constant<Z1, Z1::kNone>{});
}

// Instruction count matters as much as bytes here (ncu, H200: the streaming
// kernel issues on 80% of cycles), hence: pass 1 without below()'s selects
// once the anchors are finite, with the z1 mode fixed per row and only the
// weighted sum its divergence reads, the gradient loop compiled per divergence
// and term weights (GradVariant) with no label test inside, and exps taken as
// exp_affine's one FFMA before 2^x (notes/gpu-tuning.md, change 3). Each
// pass after the first runs in the direction opposite to the one before it,
// starting on what is most likely still in L2. Registers are capped so that
// three 512-thread blocks share a multiprocessor (unbounded, ptxas took 58-80).
template <typename S, typename Tt>
__global__ void __launch_bounds__(kMaxThreads, 3)
    distill_rows_kernel(const S* __restrict__ student, const Tt* __restrict__ teacher,
                        int64_t s_stride, int64_t t_stride, const int64_t* __restrict__ labels,
                        const float* __restrict__ grad_scale, float* __restrict__ hard,
                        float* __restrict__ soft, S* __restrict__ grad, int64_t v,
                        const LossParams p) {
  __shared__ RowStats stats_smem[kMaxWarps];
  __shared__ JsdSums jsd_smem[kMaxWarps];
  __shared__ RowConsts consts_smem;

  const int64_t i = blockIdx.x;
  const Row<S, Tt> row(student + i * s_stride, teacher + i * t_stride,
                       grad ? grad + i * v : nullptr, v);
  const int64_t label = labels ? labels[i] : -1;
  const bool ignored = labels && label == p.ignore_index;

  if (ignored) {
    if (threadIdx.x == 0) hard[i] = soft[i] = 0.f;
    if (row.g) {
      row.for_each([&](int64_t j, const float*, const float*, auto n) {
        Pack<S, decltype(n)::value> zeros;
#pragma unroll
        for (int k = 0; k < n; ++k) zeros.v[k] = S(0.f);
        *reinterpret_cast<Pack<S, decltype(n)::value>*>(row.g + j) = zeros;
      });
    }
    return;
  }
  const bool label_ok = label_readable(labels != nullptr, label, i, v, p);

  const auto merge_stats = [&p](const RowStats& a, const RowStats& b) {
    return stats_merge(a, b, p.inv_t);
  };
  RowStats st = stats_empty();
  with_divergence(p.div, [&](auto d) {
    // Only the weighted sum this divergence reads (sums_for).
    constexpr WeightedSums kSums = sums_for(decltype(d)::value);
    with_z1(z1_mode(p), [&](auto z1_how) {
      row.for_each([&](int64_t, const float* s, const float* t, auto n) {
        stats_raise(st, s, t, n, p.inv_t);
        // Two loops, not one with a run-time flag: that one computed both forms.
        const auto add = [&](auto finite) {
#pragma unroll
          for (int k = 0; k < n; ++k) {
            accumulate_terms<kSums.ws, kSums.wt>(s[k], t[k], st.ms, st.mt, st.ref, p.inv_t, z1_how,
                                                 st.zs, st.zt, st.z1, st.ws, st.wt, finite);
          }
        };
        if (anchors_finite(st)) {
          add(std::true_type{});
        } else {
          add(std::false_type{});
        }
      });
    });
  });
  st = block_reduce(st, merge_stats, stats_empty(), stats_smem);
  if (threadIdx.x == 0) consts_smem = row_consts(st, p);
  __syncthreads();
  RowConsts c = consts_smem;

  if (p.div == Divergence::kJSD) {
    JsdSums acc{0.f, 0.f};
    row.template for_each<true>([&](int64_t, const float* s, const float* t, auto n) {
#pragma unroll
      for (int k = 0; k < n; ++k) jsd_accumulate(acc, s[k], t[k], c, p);
    });
    const auto merge_jsd = [](const JsdSums& a, const JsdSums& b) { return jsd_merge(a, b); };
    acc = block_reduce(acc, merge_jsd, JsdSums{0.f, 0.f}, jsd_smem);
    if (threadIdx.x == 0) jsd_finish(consts_smem, acc, p);
    __syncthreads();
    c = consts_smem;
  }

  if (threadIdx.x == 0)
    write_row_losses(hard, soft, i, row.s, labels != nullptr, label, label_ok, c, p);
  if (row.g) {
    const GradCoefs gk = grad_coefs(p, grad_scale ? *grad_scale : 1.f);
    with_grad_variant(p, [&](auto variant) {
      using Variant = decltype(variant);
      // Backwards after pass 1, forwards after JSD's backward pass.
      constexpr bool kReverse = Variant::kDivergence != Divergence::kJSD;
      row.template for_each<kReverse>([&](int64_t j, const float* s, const float* t, auto n) {
        Pack<S, decltype(n)::value> out;
#pragma unroll
        for (int k = 0; k < n; ++k) {
          out.v[k] = static_cast<S>(Variant::element(s[k], t[k], false, c, p, gk));
        }
        *reinterpret_cast<Pack<S, decltype(n)::value>*>(row.g + j) = out;
      });
      // The label's own element, rewritten once the whole row is written (the
      // barrier orders the two stores): a test per element, or even per pack,
      // cost more instructions and registers than this. The label is read
      // again rather than kept in registers through the loop.
      __syncthreads();
      if (threadIdx.x == 0 && labels) {
        const int64_t y = labels[i];
        if (y >= 0 && y < v) {  // not ignore_index: that row has returned
          const float sy = static_cast<float>(student[i * s_stride + y]);
          const float ty = static_cast<float>(teacher[i * t_stride + y]);
          grad[i * v + y] = static_cast<S>(Variant::element(sy, ty, true, c, p, gk));
        }
      }
    });
  }
}

// Threads per row: enough for about one pack each on short rows, at most
// kMaxThreads (a whole number of warps).
inline int threads_for(int64_t v, int width) {
  const int64_t packs = (v + width - 1) / width;
  const int64_t warps = (packs + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(std::min<int64_t>(kMaxWarps, warps)) * kWarpSize;
}

}  // namespace cuda
}  // namespace kdfused
