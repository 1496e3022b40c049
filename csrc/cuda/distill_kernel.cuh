// The CUDA kernels' device code. Two kernels, one math (kdfused_math.h):
//
// - distill_resident_kernel (opt-in until it has run on a GPU, see
//   kDefaultCudaKernel): a row is split over a thread-block cluster (up to 16
//   blocks on sm_90) and each thread loads its share of both rows once, as
//   16-byte packs kept in registers. The statistics, the JSD sums and the
//   gradient are all computed from those registers, so each element costs the
//   byte floor: read student + read teacher + write gradient. Blocks exchange
//   their partial statistics through distributed shared memory.
// - distill_rows_kernel (any shape; the default): one block per row; each
//   thread streams its share in packs (scalar head and tail where the row is
//   not aligned) once per pass, so the row is read from memory again for the
//   gradient (and for JSD). It also takes what the resident kernel cannot: V
//   not a multiple of the pack width, rows off pack alignment, V too large
//   for a cluster's registers.
//
// Both keep per-thread online-softmax states, merged in a fixed order (warp
// shuffles, then the cluster in rank order), so results are bit-identical run
// to run. All accumulation is float32.
//
// Kept apart from the launcher (distill_cuda.cu) so that the CPU-only test
// suite can also run this code, under tests/emulator/ (a thread per CUDA thread).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "../distill_op.h"
#include "../kdfused_math.h"

#ifndef KDFUSED_EMULATED
#include <cooperative_groups.h>
#endif

namespace kdfused {
namespace cuda {

#ifndef KDFUSED_EMULATED
// Thread-block cluster primitives (sm_90 and later). Compiled for an older
// architecture, every cluster is one block (the launcher then launches no
// larger cluster: it reads the architecture the kernel was compiled for).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ inline unsigned cluster_blocks() {
  return cooperative_groups::this_cluster().num_blocks();
}
__device__ inline unsigned cluster_rank() {
  return cooperative_groups::this_cluster().block_rank();
}
__device__ inline void cluster_sync() { cooperative_groups::this_cluster().sync(); }
template <typename T>
__device__ T* cluster_peer(T* shared, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(shared, static_cast<int>(rank));
}
#else
__device__ inline unsigned cluster_blocks() { return 1; }
__device__ inline unsigned cluster_rank() { return 0; }
__device__ inline void cluster_sync() { __syncthreads(); }
template <typename T>
__device__ T* cluster_peer(T* shared, unsigned) {
  return shared;
}
#endif
// One block-shared variable (the emulator gives each block of a cluster its own).
#define KDFUSED_BLOCK_SHARED(Type, name) __shared__ Type name
#endif

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

// x, as a value the compiler must assume changed: what is computed from it is
// computed again rather than kept alive from an earlier use.
template <typename T>
__device__ T opaque(T x) {
#ifdef __CUDA_ARCH__
  static_assert(sizeof(T) % sizeof(uint32_t) == 0, "whole 32-bit words");
  uint32_t* words = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(T) / sizeof(uint32_t)); ++k) {
    asm volatile("" : "+r"(words[k]));
  }
#endif
  return x;
}

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
                                      const LossParams& p, bool print) {
  const bool label_ok = !has_labels || (label >= 0 && label < v);
  if (!label_ok && threadIdx.x == 0) {
    if (print) {
      printf(
          "kdfused: labels[%lld] = %lld is outside [0, V) with V = %lld and is not "
          "ignore_index = %lld\n",
          static_cast<long long>(i), static_cast<long long>(label), static_cast<long long>(v),
          static_cast<long long>(p.ignore_index));
    }
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

// Whether a state's anchors are all finite: then x - m needs no select for
// x = -inf (-inf - finite is -inf already).
__device__ inline bool anchors_finite(const RowStats& st) {
  using std::isfinite;
  return isfinite(st.ms) && isfinite(st.mt) && isfinite(st.ref);
}

// Calls f(std::integral_constant<Z1, ...>) for the run-time z1 mode.
template <typename F>
__device__ void with_z1(Z1 how, F&& f) {
  if (how == Z1::kSquare) return f(std::integral_constant<Z1, Z1::kSquare>{});
  if (how == Z1::kExp) return f(std::integral_constant<Z1, Z1::kExp>{});
  f(std::integral_constant<Z1, Z1::kNone>{});
}

// grad_element as a GradVariant-like type (the divergence tested per element).
struct AnyGradVariant {
  __device__ static float element(float s, float t, bool is_label, const RowConsts& c,
                                  const LossParams& p) {
    return grad_element(s, t, is_label, c, p);
  }
};

// kLean (KDFUSED_CUDA_KERNEL=lean, under measurement): the same math with
// fewer instructions and fewer bytes from memory: pass 1 without below()'s
// selects once the anchors are finite and with the z1 mode known per row, the
// gradient loop compiled per divergence and term weights (GradVariant), and
// each pass after the first in the direction opposite to the one before it;
// registers capped so that three 512-thread blocks share a multiprocessor
// (unbounded, ptxas took 58-64 and left room for two).
template <typename S, typename Tt, bool kLean = false>
__global__ void __launch_bounds__(kMaxThreads, kLean ? 3 : 1)
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
  const bool label_ok = label_readable(labels != nullptr, label, i, v, p, true);

  const auto merge_stats = [&p](const RowStats& a, const RowStats& b) {
    return stats_merge(a, b, p.inv_t);
  };
  RowStats st = stats_empty();
  const auto pass1 = [&](auto z1_how) {  // a Z1, or an integral_constant of one
    row.for_each([&](int64_t, const float* s, const float* t, auto n) {
      stats_raise(st, s, t, n, p.inv_t);
      if (kLean && anchors_finite(st)) {
#pragma unroll
        for (int k = 0; k < n; ++k) {
          accumulate_terms(s[k], t[k], st.ms, st.mt, st.ref, p.inv_t, z1_how, st.zs, st.zt, st.z1,
                           st.ws, st.wt, true);
        }
      } else {
#pragma unroll
        for (int k = 0; k < n; ++k) stats_accumulate(st, s[k], t[k], p.inv_t, z1_how);
      }
    });
  };
  if constexpr (kLean) {
    with_z1(z1_mode(p), pass1);
  } else {
    pass1(z1_mode(p));
  }
  st = block_reduce(st, merge_stats, stats_empty(), stats_smem);
  if (threadIdx.x == 0) consts_smem = row_consts(st, p);
  __syncthreads();
  RowConsts c = consts_smem;

  if (p.div == Divergence::kJSD) {
    JsdSums acc{0.f, 0.f};
    row.template for_each<kLean>([&](int64_t, const float* s, const float* t, auto n) {
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
    const float scale = grad_scale ? *grad_scale : 1.f;
    const auto grad_pass = [&](auto variant, auto reverse) {
      using Variant = decltype(variant);
      row.template for_each<decltype(reverse)::value>(
          [&](int64_t j, const float* s, const float* t, auto n) {
            Pack<S, decltype(n)::value> out;
#pragma unroll
            for (int k = 0; k < n; ++k) {
              out.v[k] = static_cast<S>(scale * Variant::element(s[k], t[k], j + k == label, c, p));
            }
            *reinterpret_cast<Pack<S, decltype(n)::value>*>(row.g + j) = out;
          });
    };
    if constexpr (kLean) {
      with_grad_variant(p, [&](auto variant) {  // JSD's pass ran in reverse
        grad_pass(variant,
                  std::bool_constant<decltype(variant)::kDivergence != Divergence::kJSD>{});
      });
    } else {
      grad_pass(AnyGradVariant{}, std::false_type{});
    }
  }
}

// The resident kernel's shape on the GPU: K packs per thread and input (32
// registers of logits whatever the dtypes; with 8, ptxas spills), at most 512
// threads per block (256 preferred: at 128 registers per thread two blocks
// then share a multiprocessor, one loading while the other computes), at most
// 16 blocks per cluster (8 is the portable limit; 16 where the hardware
// schedules it). Together: V up to 262144 for 16-bit logits, 131072 for
// float32.
constexpr int kResidentPacks = 4;
constexpr int kResidentThreads = 512;
constexpr int kPortableCluster = 8;
constexpr int kMaxCluster = 16;

struct ResidentShared {
  RowStats stats[kMaxWarps];  // block_reduce's partials
  JsdSums jsd[kMaxWarps];
  RowStats block_stats;  // this block's share of the row, read by the whole cluster
  JsdSums block_jsd;
  RowConsts consts;
};

// One row per cluster of cluster_blocks() blocks; block r holds packs
// [r T K, (r + 1) T K) of the row (T threads, K packs each, pack k of thread x
// at r T K + k T + x: each load instruction of a warp reads 512 contiguous
// bytes). Needs V a multiple of the pack width W and every row start
// pack-aligned (the launcher checks). Packs past the row end hold -inf in both
// inputs, which adds nothing to any sum.
template <typename S, typename Tt, int K>
__global__ void __launch_bounds__(kResidentThreads, 1)
    distill_resident_kernel(const S* __restrict__ student, const Tt* __restrict__ teacher,
                            int64_t s_stride, int64_t t_stride, const int64_t* __restrict__ labels,
                            const float* __restrict__ grad_scale, float* __restrict__ hard,
                            float* __restrict__ soft, S* __restrict__ grad, int64_t v,
                            const LossParams p) {
  constexpr int W = pack_width<S, Tt>();
  KDFUSED_BLOCK_SHARED(ResidentShared, sh);
  const unsigned blocks = cluster_blocks();
  const unsigned rank = cluster_rank();
  const int64_t i = blockIdx.x / blocks;
  const S* s_row = student + i * s_stride;
  const Tt* t_row = teacher + i * t_stride;
  S* g_row = grad ? grad + i * v : nullptr;
  const int64_t packs = v / W;
  const int64_t first = static_cast<int64_t>(rank) * blockDim.x * K + threadIdx.x;
  const auto pack_at = [&](int k) { return first + static_cast<int64_t>(k) * blockDim.x; };

  const int64_t label = labels ? labels[i] : -1;
  if (labels && label == p.ignore_index) {
    if (rank == 0 && threadIdx.x == 0) hard[i] = soft[i] = 0.f;
    if (g_row) {
      Pack<S, W> zeros;
#pragma unroll
      for (int w = 0; w < W; ++w) zeros.v[w] = S(0.f);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (pack_at(k) < packs) *reinterpret_cast<Pack<S, W>*>(g_row + pack_at(k) * W) = zeros;
      }
    }
    return;  // the whole cluster takes this branch
  }
  const bool label_ok = label_readable(labels != nullptr, label, i, v, p, rank == 0);

  // All loads first, so that 2 K of them are in flight per thread.
  Pack<S, W> sp[K];
  Pack<Tt, W> tp[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (pack_at(k) < packs) {
      sp[k] = *reinterpret_cast<const Pack<S, W>*>(s_row + pack_at(k) * W);
      tp[k] = *reinterpret_cast<const Pack<Tt, W>*>(t_row + pack_at(k) * W);
    } else {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        sp[k].v[w] = S(neg_inf());
        tp[k].v[w] = Tt(neg_inf());
      }
    }
  }
  // Calls f(s, t, column) on every element this thread holds (padding too).
  // The packs are converted again in each pass (opaque): kept as floats
  // across passes they would take twice the registers and spill.
  const auto for_each = [&](auto&& f) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const Pack<S, W> sk = opaque(sp[k]);
      const Pack<Tt, W> tk = opaque(tp[k]);
#pragma unroll
      for (int w = 0; w < W; ++w) {
        f(static_cast<float>(sk.v[w]), static_cast<float>(tk.v[w]), pack_at(k) * W + w);
      }
    }
  };

  // Statistics: this thread's maxima first (its elements are all at hand, so
  // the sums never need rescaling), then the sums, then block and cluster.
  RowStats st = stats_empty();
  {
    float cms = neg_inf(), cmt = neg_inf(), t_at = neg_inf();
    for_each([&](float s, float t, int64_t) {
      if (s > cms) {
        cms = s;
        t_at = t;
      }
      cmt = max_keep(cmt, t);
    });
    stats_raise(st, cms, cmt, t_at, p.inv_t);
  }
  const Z1 z1_how = z1_mode(p);
  for_each([&](float s, float t, int64_t) { stats_accumulate(st, s, t, p.inv_t, z1_how); });
  const auto merge_stats = [&p](const RowStats& a, const RowStats& b) {
    return stats_merge(a, b, p.inv_t);
  };
  st = block_reduce(st, merge_stats, stats_empty(), sh.stats);
  if (threadIdx.x == 0) sh.block_stats = st;
  cluster_sync();
  if (threadIdx.x == 0) {
    // Every block merges the same states in the same order: equal constants.
    RowStats all = *cluster_peer(&sh.block_stats, 0);
    for (unsigned r = 1; r < blocks; ++r) {
      all = stats_merge(all, *cluster_peer(&sh.block_stats, r), p.inv_t);
    }
    sh.consts = row_consts(all, p);
  }
  cluster_sync();  // consts ready; and no block leaves while a peer still reads it
  RowConsts c = sh.consts;

  if (p.div == Divergence::kJSD) {
    JsdSums acc{0.f, 0.f};
    for_each([&](float s, float t, int64_t) { jsd_accumulate(acc, s, t, c, p); });
    const auto merge_jsd = [](const JsdSums& a, const JsdSums& b) { return jsd_merge(a, b); };
    acc = block_reduce(acc, merge_jsd, JsdSums{0.f, 0.f}, sh.jsd);
    if (threadIdx.x == 0) sh.block_jsd = acc;
    cluster_sync();
    if (threadIdx.x == 0) {
      JsdSums all = *cluster_peer(&sh.block_jsd, 0);
      for (unsigned r = 1; r < blocks; ++r) all = jsd_merge(all, *cluster_peer(&sh.block_jsd, r));
      jsd_finish(sh.consts, all, p);
    }
    cluster_sync();
    c = sh.consts;
  }

  if (rank == 0 && threadIdx.x == 0) {
    write_row_losses(hard, soft, i, s_row, labels != nullptr, label, label_ok, c, p);
  }
  if (g_row) {
    const float scale = grad_scale ? *grad_scale : 1.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (pack_at(k) >= packs) continue;
      Pack<S, W> out;
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float s = static_cast<float>(sp[k].v[w]);
        const float t = static_cast<float>(tp[k].v[w]);
        out.v[w] = static_cast<S>(scale * grad_element(s, t, pack_at(k) * W + w == label, c, p));
      }
      *reinterpret_cast<Pack<S, W>*>(g_row + pack_at(k) * W) = out;
    }
  }
}

// How the resident kernel covers a row of `packs` packs at k packs per
// thread: the smallest cluster (1, 2, 4, ... up to max_cluster blocks) of
// blocks of at most max_threads / 2 threads that holds it, else of at most
// max_threads, and just enough threads (whole warps). cluster = 0: the row
// does not fit.
struct ResidentShape {
  int threads = 0;
  int cluster = 0;
};

inline ResidentShape resident_shape(int64_t packs, int k, int max_threads, int max_cluster) {
  for (int cap : {max_threads / 2, max_threads}) {
    for (int c = 1; c <= max_cluster; c *= 2) {
      const int64_t per_block = (packs + c - 1) / c;
      if (per_block <= static_cast<int64_t>(cap) * k) {
        const int64_t threads = (per_block + k - 1) / k;
        const int64_t warps = std::max<int64_t>(1, (threads + kWarpSize - 1) / kWarpSize);
        return ResidentShape{static_cast<int>(warps * kWarpSize), c};
      }
    }
  }
  return ResidentShape{};
}

// Whether every row of a (rows x ?) view with this stride starts on a
// boundary of `width` elements of type T.
template <typename T>
bool rows_aligned(const T* base, int64_t stride, int width) {
  return reinterpret_cast<uintptr_t>(base) % (sizeof(T) * width) == 0 && stride % width == 0;
}

// Which kernel runs when KDFUSED_CUDA_KERNEL is unset. The streaming kernel
// until the resident one has passed the CUDA suite on a GPU: it was written
// after the only GPU run so far and is checked by the emulator alone
// (notes/gpu-tuning.md). Then this becomes "auto".
constexpr const char* kDefaultCudaKernel = "stream";

// The kernel choice: KDFUSED_CUDA_KERNEL = stream (the streaming kernel), lean
// (its kLean form), auto (the resident kernel wherever it fits, else the
// streaming one) or resident (the resident kernel, an error where it does not
// fit), for tests and benchmarks; kDefaultCudaKernel when unset.
inline std::string cuda_kernel_mode() {
  const char* env = std::getenv("KDFUSED_CUDA_KERNEL");
  const std::string mode = env ? env : kDefaultCudaKernel;
  TORCH_CHECK_VALUE(mode == "auto" || mode == "stream" || mode == "lean" || mode == "resident",
                    "kdfused: KDFUSED_CUDA_KERNEL must be stream, lean, auto or resident, got '",
                    mode, "'");
  return mode;
}

// The resident kernel's shape for a problem under a cuda_kernel_mode(), or
// cluster = 0 for the streaming kernel. KDFUSED_CUDA_MAX_CLUSTER lowers
// max_cluster (for tests and benchmarks).
template <typename S, typename Tt>
ResidentShape choose_resident(const std::string& mode, const S* student, int64_t s_stride,
                              const Tt* teacher, int64_t t_stride, int64_t n, int64_t v, int k,
                              int max_threads, int max_cluster) {
  constexpr int W = pack_width<S, Tt>();
  if (mode == "stream" || mode == "lean") return ResidentShape{};
  if (const char* cap = std::getenv("KDFUSED_CUDA_MAX_CLUSTER")) {
    const int blocks = std::atoi(cap);
    TORCH_CHECK_VALUE(blocks >= 1, "kdfused: KDFUSED_CUDA_MAX_CLUSTER must be a positive integer");
    max_cluster = std::min(max_cluster, blocks);
  }
  ResidentShape shape;
  if (v % W == 0 && rows_aligned(student, s_stride, W) && rows_aligned(teacher, t_stride, W)) {
    shape = resident_shape(v / W, k, max_threads, max_cluster);
  }
  if (n * shape.cluster > std::numeric_limits<int32_t>::max()) shape = ResidentShape{};
  TORCH_CHECK(mode != "resident" || shape.cluster > 0,
              "kdfused: KDFUSED_CUDA_KERNEL=resident, but the resident kernel does not take this "
              "problem (it needs V a multiple of ",
              text(static_cast<int64_t>(W)),
              ", pack-aligned rows and V small enough for one cluster)");
  return shape;
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
