// The CUDA kernel's device code (the math is kdfused_math.h's): one block
// per row (or a cluster of blocks, each with a part of the row: below); each
// thread streams its share of the row in 16-byte packs (scalar head and tail
// where the row is not aligned) once per pass: statistics, JSD's sums (JSD
// only), gradient. Per-thread online-softmax states are merged in a fixed
// order (warp shuffles, then one warp, then the cluster's blocks by rank), so
// results are bit-identical run to run. All accumulation is float32.
//
// Each row is read twice (three times for JSD): 10 bytes per bf16 element
// instead of the 6-byte floor when the second read misses L2 (docs/cuda-tuning.md
// has the measurements and what was tried against that).
//
// Kept apart from the launcher (distill_cuda.cu) so that the CPU-only test
// suite can also run this code, under tests/emulator/ (a thread per CUDA thread).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <type_traits>
#ifndef KDFUSED_EMULATED
#include <cooperative_groups.h>
#endif

#include "../distill_op.h"  // text()
#include "../kdfused_math.h"

namespace kdfused {
namespace cuda {

#ifndef KDFUSED_EMULATED
// Thread-block cluster primitives (sm_90 and later; tests/emulator/ has its
// own). Compiled for an older architecture every cluster is one block, and the
// launcher launches no larger one there.
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
// One block's shared memory, declared where it is used.
#define KDFUSED_BLOCK_SHARED(Type, name) __shared__ Type name
#endif

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
// Threads of a block that holds part of a row (kSplit): four such blocks per
// multiprocessor, so that one block's cluster barrier overlaps other blocks'
// streaming (the dropped resident kernel's blocks had nothing to overlap with).
constexpr int kSplitThreads = 256;

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
// the host raises at its next synchronisation; thread 0 of the row's first
// block prints it first.
__device__ inline bool label_readable(bool has_labels, int64_t label, int64_t i, int64_t v,
                                      const LossParams& p, bool first_part) {
  const bool label_ok = !has_labels || (label >= 0 && label < v);
  if (!label_ok && threadIdx.x == 0 && first_part) {
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
  hard[i] = !has_labels ? 0.f : label_ok ? hard_loss(static_cast<float>(s_row[label]), c, p) : nan;
  soft[i] = p.soft_scale * c.div;
}

// Calls f(std::integral_constant<Z1, ...>) for the run-time z1 mode.
template <typename F>
__device__ void with_z1(Z1 how, F&& f) {
  if (how == Z1::kSquare) return f(std::integral_constant<Z1, Z1::kSquare>{});
  if (how == Z1::kExp) return f(std::integral_constant<Z1, Z1::kExp>{});
  f(std::integral_constant<Z1, Z1::kNone>{});
}

// A block's shared memory, as one struct (the emulator gives each block of a
// cluster its own).
struct BlockShared {
  RowStats stats[kMaxWarps];
  JsdSums jsd[kMaxWarps];
  RowConsts consts;
  RowStats part_stats;  // this block's part of the row, read by its cluster peers
  JsdSums part_jsd;
  float sums[kMaxWarps];  // label smoothing's row sum
  float part_sum;
};

// The columns [begin, end) of part `part` of a row split in `parts`: runs of
// whole packs of width w, as equal as that allows (the last may be shorter or
// empty). A part starts on a multiple of w, so it reaches pack alignment where
// the whole row does.
struct Columns {
  int64_t begin, end;
};

C10_HOST_DEVICE inline Columns part_columns(int64_t v, int w, unsigned parts, unsigned part) {
  const int64_t packs = (v + w - 1) / w;
  const int64_t per = (packs + parts - 1) / parts * w;
  const int64_t begin = std::min<int64_t>(v, part * per);
  return Columns{begin, std::min<int64_t>(v, begin + per)};
}

// The parts of a row and this block's: kSplit is false for the plain launch,
// whose kernel then has no cluster code at all.
template <bool kSplit>
__device__ unsigned row_parts() {
  return kSplit ? cluster_blocks() : 1;
}

template <bool kSplit>
__device__ unsigned row_part() {
  return kSplit ? cluster_rank() : 0;
}

// This block's row and columns, asked again where needed rather than kept:
// values live across the pack loops cost registers there, and at 40 registers
// a few more spill inside the loops.
template <bool kSplit>
__device__ int64_t block_row() {
  return blockIdx.x / row_parts<kSplit>();
}

template <typename S, typename Tt, bool kSplit>
__device__ Columns block_columns(int64_t v) {
  if (!kSplit) return Columns{0, v};
  return part_columns(v, pack_width<S, Tt>(), row_parts<kSplit>(), row_part<kSplit>());
}

// Merges the cluster's per-block values (valid in thread 0 of each block) into
// the row's, in rank order in every block, so that all get the same bits. The
// second barrier keeps each block alive until its peers have read its slot.
template <typename T, typename Merge>
__device__ T cluster_merge(T x, T* slot, unsigned parts, Merge merge) {
  if (parts == 1) return x;
  if (threadIdx.x == 0) *slot = x;
  cluster_sync();
  if (threadIdx.x == 0) {
    x = *cluster_peer(slot, 0);
    for (unsigned r = 1; r < parts; ++r) x = merge(x, *cluster_peer(slot, r));
  }
  cluster_sync();
  return x;
}

// Pass 1 of this thread's elements of a row: their online-softmax state and,
// with kEnt, the student entropy's sum hs (entropy_term) at the state's ms.
template <bool kEnt, typename S, typename Tt>
__device__ RowStats thread_stats(const Row<S, Tt>& row, const LossParams& p, float& hs) {
  RowStats st = stats_empty();
  with_divergence(p.div, [&](auto d) {
    // Only the weighted sum this divergence reads (sums_for).
    constexpr WeightedSums kSums = sums_for(decltype(d)::value);
    with_z1(z1_mode(p), [&](auto z1_how) {
      row.for_each([&](int64_t, const float* s, const float* t, auto n) {
        [[maybe_unused]] const float ms_old = st.ms, zs_old = st.zs;  // read only with kEnt
        stats_raise(st, s, t, n, p.inv_t);
        if constexpr (kEnt) hs = entropy_moved(hs, zs_old, ms_old, st.ms, p.inv_t);
        // Two loops, not one with a run-time flag: that one computed both forms.
        const auto add = [&](auto finite) {
#pragma unroll
          for (int k = 0; k < n; ++k) {
            const ScaledExps e = accumulate_terms<kSums.ws, kSums.wt>(
                s[k], t[k], st.ms, st.mt, st.ref, p.inv_t, z1_how, st.zs, st.zt, st.z1, st.ws,
                st.wt, finite);
            if constexpr (kEnt) hs += entropy_term(s[k], st.ms, e.es, finite);
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
  return st;
}

// The state alone (the vocab-parallel statistics phase's).
template <typename S, typename Tt>
__device__ RowStats thread_stats(const Row<S, Tt>& row, const LossParams& p) {
  float unused = 0.f;
  return thread_stats<false>(row, p, unused);
}

// Label smoothing's row sum over this thread's elements: sum (s - ms).
template <typename S, typename Tt>
__device__ float thread_sum_below(const Row<S, Tt>& row, float ms) {
  float sum = 0.f;
  row.for_each([&](int64_t, const float* s, const float*, auto n) {
#pragma unroll
    for (int k = 0; k < n; ++k) sum += smooth_term(s[k], ms);
  });
  return sum;
}

// Instruction count matters as much as bytes here (ncu, H200: the streaming
// kernel issues on 80% of cycles), hence: pass 1 without below()'s selects
// once the anchors are finite, with the z1 mode fixed per row and only the
// weighted sum its divergence reads, the gradient loop compiled per divergence
// and term weights (GradVariant) with no label test inside, and exps taken as
// exp_affine's one FFMA before 2^x (docs/cuda-tuning.md, change 3). Each
// pass after the first runs in the direction opposite to the one before it,
// starting on what is most likely still in L2. Registers are capped so that
// three 512-thread blocks share a multiprocessor (unbounded, ptxas took 58-80).
//
// kSplit: launched in clusters of k blocks (KDFUSED_CUDA_SPLIT, sm_90), row i
// is split over cluster i: block r takes part_columns(v, W, k, r), and the
// statistics and JSD's sums are merged through distributed shared memory
// (cluster_merge). A row is then in flight for about 1/k of the time, so its
// second read is likelier to come from L2 (docs/cuda-tuning.md, change 4).
// Blocks of kSplitThreads, four per multiprocessor (64 registers: at 40 the
// merges made ptxas spill inside the pack loops). Not measured on a GPU yet,
// so not the default.
//
// kEntropy: also entropy[i] = H(softmax(s_i / T)), from a sum pass 1 keeps
// beside its state; each thread moves its sum to the row's max once the
// statistics are merged, and one more float is reduced. Without it (the
// default) the kernel is the one it was.
template <typename S, typename Tt, bool kSplit = false, bool kEntropy = false>
__global__ void __launch_bounds__(kSplit ? kSplitThreads : kMaxThreads, kSplit ? 4 : 3)
    distill_rows_kernel(const S* __restrict__ student, const Tt* __restrict__ teacher,
                        int64_t s_stride, int64_t t_stride, const int64_t* __restrict__ labels,
                        const float* __restrict__ grad_scale, float* __restrict__ hard,
                        float* __restrict__ soft, S* __restrict__ grad, float* __restrict__ entropy,
                        int64_t v, const LossParams p) {
  KDFUSED_BLOCK_SHARED(BlockShared, sh);
  const unsigned parts = row_parts<kSplit>();
  const int64_t i = block_row<kSplit>();
  const Columns cols = block_columns<S, Tt, kSplit>(v);
  const Row<S, Tt> row(student + i * s_stride + cols.begin, teacher + i * t_stride + cols.begin,
                       grad ? grad + i * v + cols.begin : nullptr, cols.end - cols.begin);
  const int64_t label = labels ? labels[i] : -1;
  const bool ignored = labels && label == p.ignore_index;

  if (ignored) {  // the same in every block of a cluster: none of them syncs
    if (threadIdx.x == 0 && row_part<kSplit>() == 0) {
      hard[i] = soft[i] = 0.f;
      if constexpr (kEntropy) entropy[i] = 0.f;
    }
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
  const bool label_ok = label_readable(labels != nullptr, label, i, v, p, row_part<kSplit>() == 0);

  const auto merge_stats = [&p](const RowStats& a, const RowStats& b) {
    return stats_merge(a, b, p.inv_t);
  };
  float hs = 0.f;  // the entropy's sum (kEntropy)
  RowStats st = thread_stats<kEntropy>(row, p, hs);
  [[maybe_unused]] const float ms_mine = st.ms, zs_mine = st.zs;  // hs's anchor (kEntropy)
  st = block_reduce(st, merge_stats, stats_empty(), sh.stats);
  st = cluster_merge(st, &sh.part_stats, parts, merge_stats);
  if (threadIdx.x == 0) sh.consts = row_consts(st, p);
  __syncthreads();
  RowConsts c = sh.consts;

  if constexpr (kEntropy) {
    // Every thread's sum at the row's max: then merging them is addition.
    float h = entropy_moved(hs, zs_mine, ms_mine, c.ms, p.inv_t);
    const auto add = [](float a, float b) { return a + b; };
    h = block_reduce(h, add, 0.f, sh.sums);
    h = cluster_merge(h, &sh.part_sum, parts, add);
    if (threadIdx.x == 0 && row_part<kSplit>() == 0) {
      entropy[block_row<kSplit>()] = row_entropy(h, st.zs, p.inv_t);
    }
  }

  if (p.smoothing && labels != nullptr) {
    // Label smoothing's row sum, sum (s - ms), in a pass of its own (only
    // when smoothing: pass 1 stays as it is without it).
    float sum = thread_sum_below(row, c.ms);
    const auto add = [](float a, float b) { return a + b; };
    sum = block_reduce(sum, add, 0.f, sh.sums);
    sum = cluster_merge(sum, &sh.part_sum, parts, add);
    if (threadIdx.x == 0) sh.consts.sum_below = sum;
    __syncthreads();
    c = sh.consts;
  }

  if (p.div == Divergence::kJSD) {
    JsdSums acc{0.f, 0.f};
    row.template for_each<true>([&](int64_t, const float* s, const float* t, auto n) {
#pragma unroll
      for (int k = 0; k < n; ++k) jsd_accumulate(acc, s[k], t[k], c, p);
    });
    const auto merge_jsd = [](const JsdSums& a, const JsdSums& b) { return jsd_merge(a, b); };
    acc = block_reduce(acc, merge_jsd, JsdSums{0.f, 0.f}, sh.jsd);
    acc = cluster_merge(acc, &sh.part_jsd, parts, merge_jsd);
    if (threadIdx.x == 0) jsd_finish(sh.consts, acc, p);
    __syncthreads();
    c = sh.consts;
  }

  if (threadIdx.x == 0 && row_part<kSplit>() == 0) {
    // Row and label asked again, not kept from the top: keeping them cost the
    // bf16 pack loops up to 2 instructions per pack (scripts/sass_loops.py, sm_90).
    const int64_t r = block_row<kSplit>();
    write_row_losses(hard, soft, r, student + r * s_stride, labels != nullptr,
                     labels ? labels[r] : -1, label_ok, c, p);
  }
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
        const int64_t r = block_row<kSplit>();
        const int64_t y = labels[r];
        const Columns mine = block_columns<S, Tt, kSplit>(v);
        // In [0, V) (not ignore_index: that row has returned) and in this part.
        if (y >= mine.begin && y < mine.end) {
          const float sy = static_cast<float>(student[r * s_stride + y]);
          const float ty = static_cast<float>(teacher[r * t_stride + y]);
          grad[r * v + y] = static_cast<S>(Variant::element(sy, ty, true, c, p, gk));
        }
      }
    });
  }
}

// KDFUSED_CUDA_SPLIT = k, a benchmark knob (unset: 1): the blocks per row the
// launcher asks for, 1 to 16 (above 8, a non-portable cluster size that sm_90
// allows on request).
constexpr int kMaxSplit = 16;
constexpr int kPortableSplit = 8;

inline int requested_split() {
  const char* env = std::getenv("KDFUSED_CUDA_SPLIT");
  if (env == nullptr || *env == 0) return 1;
  char* end = nullptr;
  const long k = std::strtol(env, &end, 10);
  // The bound through text(): no number may reach TORCH_CHECK's ostream (see
  // text() in distill_op.h).
  TORCH_CHECK_VALUE(*end == 0 && k >= 1 && k <= kMaxSplit,
                    "kdfused: KDFUSED_CUDA_SPLIT must be an integer from 1 to ",
                    text(int64_t{kMaxSplit}), ", got '", env, "'");
  return static_cast<int>(k);
}

// Threads per row (per part of a row): enough for about one pack each on
// short rows, at most max_threads (a whole number of warps).
inline int threads_for(int64_t v, int width, int max_threads) {
  const int64_t packs = (v + width - 1) / width;
  const int64_t warps = (packs + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(std::min<int64_t>(max_threads / kWarpSize, warps)) * kWarpSize;
}

// The launch's threads per block: for the first (longest) part of a row split
// in `parts` (1: the whole row).
inline int block_threads(int64_t v, int width, int parts) {
  const Columns first = part_columns(v, width, parts, 0);
  return threads_for(first.end - first.begin, width, parts > 1 ? kSplitThreads : kMaxThreads);
}

}  // namespace cuda
}  // namespace kdfused
