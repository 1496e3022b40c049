// The sparse-teacher CPU kernels (docs/design.md, "The sparse teacher"): the loss against k
// stored teacher log-probabilities per row, and the top-k extraction. One task
// per block of rows (at::parallel_for). The loss reads each student row twice:
// pass 1, an online softmax that keeps the tail's sum apart (a mask over the
// row marks the kept ids), and the gradient pass, p_s h_g everywhere, then the
// kept ids and the label rewritten. The bucket math is kdfused_math.h's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../sparse_op.h"
#include "../sparse_shard_op.h"
#include "cpu_common.h"

namespace kdfused {
namespace {

using namespace cpu;  // NOLINT: the shared chunk helpers

// The maximum of a chunk (NaN skipped, like max_keep), in lanes.
KDFUSED_INLINE float max_chunk(const float* s, int64_t len) {
  using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));
  Lanes m;
  for (int l = 0; l < kLanes; ++l) m[l] = neg_inf();
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    Lanes x;
    std::memcpy(&x, s + k, sizeof(x));
    m = x > m ? x : m;
  }
  float out = neg_inf();
  for (int l = 0; l < kLanes; ++l) out = max_keep(out, m[l]);
  for (; k < len; ++k) out = max_keep(out, s[k]);
  return out;
}

// Adds a chunk whose max the state already covers, keeping the exps in es.
// tail[k] is 1 for an id outside the kept set, 0 for a kept one.
template <Z1 kZ1, bool kFinite>
KDFUSED_INLINE void sparse_add_chunk(SparseStats& st, const float* KD_R s, const float* KD_R tail,
                                     int64_t len, float inv_t, float* KD_R es) {
  const float ms = st.ms;
  float zs[kLanes] = {}, zt[kLanes] = {}, z1[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      es[k + l] =
          sparse_accumulate(s[k + l], tail[k + l], ms, inv_t, kZ1, zs[l], zt[l], z1[l], kFinite);
    }
  }
  for (int l = 0; k + l < len; ++l) {
    es[k + l] =
        sparse_accumulate(s[k + l], tail[k + l], ms, inv_t, kZ1, zs[l], zt[l], z1[l], kFinite);
  }
  st.zs += lane_sum(zs);
  st.ztail += lane_sum(zt);
  st.z1 += lane_sum(z1);
}

template <Z1 kZ1>
KDFUSED_INLINE void sparse_stats_chunk(SparseStats& st, const float* s, const float* tail,
                                       int64_t len, float inv_t, float* es) {
  sparse_rescale(st, max_chunk(s, len), inv_t);
  if (std::isfinite(st.ms)) {
    sparse_add_chunk<kZ1, true>(st, s, tail, len, inv_t, es);
  } else {
    sparse_add_chunk<kZ1, false>(st, s, tail, len, inv_t, es);
  }
}

// The gradient of a chunk's tail elements, p_s h_g for the soft term (the
// kept ids and the label are rewritten afterwards). p_s = es * fs.
template <bool kHard, bool kSoft, HardQ kQ, bool kSmooth>
KDFUSED_INLINE void sparse_grad_chunk(float* KD_R g, const float* KD_R s, const float* KD_R es,
                                      int64_t len, float fs, float tail_coef, const RowConsts& c,
                                      const GradCoefs& gk) {
  for (int64_t k = 0; k < len; ++k) {
    const float ps = es[k] * fs;
    g[k] =
        combine_grad<kHard, kSoft, kQ, kSmooth>(s ? s[k] : 0.f, ps, ps * tail_coef, false, c, gk);
  }
}

// The sum of exp((x - m) / T) over a chunk, in lanes (kFinite: m is finite,
// so x - m needs no select; a run-time test inside the loop kept GCC from
// vectorising it).
template <bool kFinite>
KDFUSED_INLINE float exp_sum_chunk(const float* KD_R x, int64_t len, float m, float inv_t) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += exp_affine(kFinite ? x[k + l] - m : below(x[k + l], m), inv_t, 0.f);
    }
  }
  for (int l = 0; k + l < len; ++l) acc[l] += exp_affine(below(x[k + l], m), inv_t, 0.f);
  return lane_sum(acc);
}

// Top-k's running softmax over a chunk whose max is cmax: z in units of m.
KDFUSED_INLINE void topk_sum_chunk(float& m, float& z, const float* KD_R x, int64_t len,
                                   float inv_t, float cmax) {
  const float m_new = max_keep(m, cmax);
  if (m_new != m) {
    z *= shifted_exp(m, m_new, inv_t);
    m = m_new;
  }
  z += std::isfinite(m) ? exp_sum_chunk<true>(x, len, m, inv_t)
                        : exp_sum_chunk<false>(x, len, m, inv_t);
}

// Whether any of x[0, len) exceeds thr (in lanes: the common answer, no, costs
// one vector compare per kLanes elements).
KDFUSED_INLINE bool any_above(const float* KD_R x, int64_t len, float thr) {
  int hits = 0;
  for (int64_t k = 0; k < len; ++k) hits += x[k] > thr ? 1 : 0;
  return hits != 0;
}

using SparseStatsFn = void (*)(SparseStats&, const float*, const float*, int64_t, float, float*);
using SparseGradFn = void (*)(float*, const float*, const float*, int64_t, float, float,
                              const RowConsts&, const GradCoefs&);
using TopkSumFn = void (*)(float&, float&, const float*, int64_t, float, float);
using AnyAboveFn = bool (*)(const float*, int64_t, float);
using MaxFn = float (*)(const float*, int64_t);

// One instruction set's chunk kernels (as distill_cpu.cpp's table).
struct SparseKernels {
  SparseStatsFn stats[3];  // [Z1 mode]
  SparseGradFn grad[kGradVariants];
  SumFn sum_below;
  TopkSumFn topk_sum;
  AnyAboveFn any_above;
  MaxFn max;  // max_chunk (in the table: compiled for the baseline alone it went scalar)
  Load16Fn load_bf16;
  Load16Fn load_f16;
  Store16Fn store_bf16;
  Store16Fn store_f16;
};

#define KDFUSED_SPARSE_GRADS(NAME) KDFUSED_GRAD_VARIANTS(NAME##_sgrad)

#define KDFUSED_SPARSE_KERNELS(NAME, ...)                                                         \
  template <Z1 kZ1>                                                                               \
  __VA_ARGS__ void NAME##_sstats(SparseStats& st, const float* s, const float* tail, int64_t len, \
                                 float inv_t, float* es) {                                        \
    sparse_stats_chunk<kZ1>(st, s, tail, len, inv_t, es);                                         \
  }                                                                                               \
  template <bool kHard, bool kSoft, HardQ kQ, bool kSmooth>                                       \
  __VA_ARGS__ void NAME##_sgrad(float* g, const float* s, const float* es, int64_t len, float fs, \
                                float tail_coef, const RowConsts& c, const GradCoefs& k) {        \
    sparse_grad_chunk<kHard, kSoft, kQ, kSmooth>(g, s, es, len, fs, tail_coef, c, k);             \
  }                                                                                               \
  __VA_ARGS__ float NAME##_ssum_below(const float* s, int64_t len, float ms) {                    \
    return sum_below_chunk(s, len, ms);                                                           \
  }                                                                                               \
  __VA_ARGS__ void NAME##_topk_sum(float& m, float& z, const float* x, int64_t len, float inv_t,  \
                                   float cmax) {                                                  \
    topk_sum_chunk(m, z, x, len, inv_t, cmax);                                                    \
  }                                                                                               \
  __VA_ARGS__ float NAME##_max(const float* x, int64_t len) { return max_chunk(x, len); }         \
  __VA_ARGS__ bool NAME##_any_above(const float* x, int64_t len, float thr) {                     \
    return any_above(x, len, thr);                                                                \
  }                                                                                               \
  const SparseKernels NAME##_sparse_kernels = {                                                   \
      {NAME##_sstats<Z1::kNone>, NAME##_sstats<Z1::kExp>, NAME##_sstats<Z1::kSquare>},            \
      KDFUSED_SPARSE_GRADS(NAME),                                                                 \
      NAME##_ssum_below,                                                                          \
      NAME##_topk_sum,                                                                            \
      NAME##_any_above,                                                                           \
      NAME##_max,                                                                                 \
      NAME##_load_bf16,                                                                           \
      NAME##_load_f16,                                                                            \
      NAME##_store_bf16,                                                                          \
      NAME##_store_f16};

KDFUSED_SPARSE_KERNELS(baseline)
#if defined(__x86_64__)
KDFUSED_SPARSE_KERNELS(avx2, KDFUSED_AVX2)
#endif

const SparseKernels& sparse_kernels() {
#if defined(__x86_64__)
  return cpu_capability() == "avx2" ? avx2_sparse_kernels : baseline_sparse_kernels;
#else
  return baseline_sparse_kernels;
#endif
}

// An entry's name in an error: indices[i, j] (padded) or indices[e] (row i,
// entry j) (ragged).
std::string entry_name(const TeacherEntries& t, int64_t i, int64_t j, int64_t e) {
  if (!t.offsets) return "indices[" + text(i) + ", " + text(j) + "]";
  return "indices[" + text(e) + "] (row " + text(i) + ", entry " + text(j) + ")";
}

// Kept ids in [0, V) (or -1: padding) and distinct within their row, checked
// before anything is computed: an error names the first bad entry.
void check_sparse_indices(const TeacherEntries& t, int64_t n, int64_t v) {
  std::vector<int64_t> seen(v, -1);  // the last row that kept each id
  for (int64_t i = 0; i < n; ++i) {
    const int64_t begin = t.row_begin(i), end = t.row_end(i);
    for (int64_t e = begin; e < end; ++e) {
      const int64_t x = t.id(e);
      if (x == -1) continue;
      TORCH_CHECK_VALUE(x >= 0 && x < v, "kdfused: sparse teacher ", entry_name(t, i, e - begin, e),
                        " = ", text(x), " is outside [0, V) with V = ", text(v),
                        " (-1 pads a row)");
      TORCH_CHECK_VALUE(seen[x] != i, "kdfused: sparse teacher ", entry_name(t, i, e - begin, e),
                        " = ", text(x), " repeats an id kept earlier in row ", text(i),
                        ": a row's kept ids must be distinct");
      seen[x] = i;
    }
  }
}

template <typename S>
struct SparseArgs {
  const S* s;
  int64_t s_stride, v;
  TeacherEntries t;  // k: the longest row
  const int64_t* y;
  LossParams p;
  Tail tail;
  float st_over_t;
  float grad_scale;
  float* hard;
  float* soft;
  S* grad;
};

template <typename S>
void sparse_rows(const SparseArgs<S>& a, const SparseKernels& kernels, int64_t begin, int64_t end) {
  const LossParams& p = a.p;
  const int64_t v = a.v;
  const SparseStatsFn stats = kernels.stats[static_cast<int>(z1_mode(p))];
  const int variant = grad_variant(p);
  const SparseGradFn grad = kernels.grad[variant];
  const bool reads_s = hard_from_logits(variant);
  const GradCoefs coefs = grad_coefs(p, a.grad_scale);
  alignas(64) float sbuf[kChunk];
  alignas(64) float gbuf[kChunk];
  std::vector<float> es(v);
  std::vector<float> tail(v, 1.f);  // 0 at the row's kept ids, restored after each row
  std::vector<float> anchors((v + kChunk - 1) / kChunk);
  std::vector<int64_t> kept(a.t.k);
  std::vector<float> kept_s(a.t.k), lb(a.t.k), ps(a.t.k), x(a.t.k);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t label = a.y ? a.y[i] : -1;
    S* g = a.grad ? a.grad + i * v : nullptr;
    if (a.y && label == p.ignore_index) {
      a.hard[i] = a.soft[i] = 0.f;
      if (g) std::fill(g, g + v, S(0));
      continue;
    }
    const S* s = a.s + i * a.s_stride;
    int64_t n = 0;  // the kept (not padded) entries, compacted
    for (int64_t e = a.t.row_begin(i), end = a.t.row_end(i); e < end; ++e) {
      const int64_t id = a.t.id(e);
      if (id < 0) continue;
      kept[n] = id;
      kept_s[n] = static_cast<float>(s[id]);
      x[n] = a.t.logprob(e);
      tail[id] = 0.f;
      ++n;
    }
    SparseStats st = sparse_empty();
    for (int64_t j0 = 0, b = 0; j0 < v; j0 += kChunk, ++b) {
      const int64_t len = std::min(kChunk, v - j0);
      stats(st, as_float(s + j0, len, sbuf, kernels), tail.data() + j0, len, p.inv_t,
            es.data() + j0);
      anchors[b] = st.ms;
    }
    for (int64_t m = 0; m < n; ++m) tail[kept[m]] = 1.f;
    SparseConsts sc = sparse_consts(st, p);
    RowConsts& c = sc.c;
    if (a.y && p.smoothing) {
      float sum = 0.f;
      for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
        const int64_t len = std::min(kChunk, v - j0);
        sum += kernels.sum_below(as_float(s + j0, len, sbuf, kernels), len, c.ms);
      }
      c.sum_below = sum;
    }
    const float inv_zs = 1.f / st.zs;
    for (int64_t m = 0; m < n; ++m) {
      lb[m] = log_ps(kept_s[m], c, p);
      ps[m] = prob_s_ratio(kept_s[m], st.ms, p.inv_t, inv_zs);
    }
    const SparseRow row = sparse_buckets(lb.data(), x.data(), n, sc.log_tail, n == v, a.tail,
                                         a.st_over_t, p, ps.data());
    const float s_label = a.y ? static_cast<float>(s[label]) : 0.f;
    a.hard[i] = a.y ? hard_loss(s_label, c, p) : 0.f;
    a.soft[i] = p.soft_scale * row.div;
    if (!g) continue;
    for (int64_t j0 = 0, b = 0; j0 < v; j0 += kChunk, ++b) {
      const int64_t len = std::min(kChunk, v - j0);
      const float* sf = reads_s ? as_float(s + j0, len, sbuf, kernels) : nullptr;
      const float fs = shifted_exp(anchors[b], st.ms, p.inv_t) * inv_zs;
      float* gf = gbuf;
      if constexpr (std::is_same_v<S, float>) gf = g + j0;
      grad(gf, sf, es.data() + j0, len, fs, row.tail_coef, c, coefs);
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        kernels.store_bf16(reinterpret_cast<uint16_t*>(g + j0), gbuf, len);
      } else if constexpr (std::is_same_v<S, c10::Half>) {
        kernels.store_f16(reinterpret_cast<uint16_t*>(g + j0), gbuf, len);
      }
    }
    // The kept ids (their own T dD/ds, left in x) and the label, if not kept.
    bool label_kept = false;
    with_grad_variant(p, [&](auto variant_type) {
      using V = decltype(variant_type);
      constexpr auto element = combine_grad<V::kHasHard, V::kHasSoft, V::kHardQ, V::kSmoothed>;
      for (int64_t m = 0; m < n; ++m) {
        const bool is_label = kept[m] == label;
        label_kept = label_kept || is_label;
        g[kept[m]] = static_cast<S>(element(kept_s[m], ps[m], x[m], is_label, c, coefs));
      }
      if (a.y && !label_kept) {
        const float ps = prob_s(s_label, c, p);
        g[label] = static_cast<S>(element(s_label, ps, ps * row.tail_coef, true, c, coefs));
      }
    });
  }
}

// The rows' top k: one pass per row over its chunks, an online softmax and a
// heap of the k best (value, id) seen so far, whose root is the worst kept
// (the smallest value, and of equal values the higher id). A later element
// enters only if strictly larger than the root, so of equal values the lower
// id stays. NaN logits are chosen only where the row has fewer than k numbers
// (the lowest NaN ids after the numbers); a row with a NaN has NaN log-probs.
template <typename S>
void topk_rows(const S* logits, int64_t stride, int64_t v, int64_t k, float inv_t, int64_t* out_idx,
               float* out_lp, const SparseKernels& kernels, int64_t begin, int64_t end) {
  alignas(64) float buf[kChunk];
  struct Entry {
    float value;
    int64_t id;
  };
  // "a is better than b": std::*_heap keep the worst at the front.
  const auto better = [](const Entry& a, const Entry& b) {
    return a.value > b.value || (a.value == b.value && a.id < b.id);
  };
  std::vector<Entry> heap;
  heap.reserve(k);
  for (int64_t i = begin; i < end; ++i) {
    const S* row = logits + i * stride;
    heap.clear();
    float m = neg_inf(), z = 0.f;
    for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
      const int64_t len = std::min(kChunk, v - j0);
      const float* x = as_float(row + j0, len, buf, kernels);
      const float cmax = kernels.max(x, len);
      kernels.topk_sum(m, z, x, len, inv_t, cmax);
      if (static_cast<int64_t>(heap.size()) == k && !(cmax > heap.front().value)) continue;
      for (int64_t g = 0; g < len; g += kLanes) {
        const int64_t end = std::min(len, g + kLanes);
        const bool full = static_cast<int64_t>(heap.size()) == k;
        if (full && !kernels.any_above(x + g, end - g, heap.front().value)) continue;
        for (int64_t j = g; j < end; ++j) {
          const float value = x[j];
          if (value != value) continue;
          if (static_cast<int64_t>(heap.size()) < k) {
            heap.push_back(Entry{value, j0 + j});
            std::push_heap(heap.begin(), heap.end(), better);
          } else if (value > heap.front().value) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = Entry{value, j0 + j};
            std::push_heap(heap.begin(), heap.end(), better);
          }
        }
      }
    }
    std::sort(heap.begin(), heap.end(), better);
    // Fewer than k numbers: the row's NaN ids fill the slots left, lowest
    // first (the numbers are not among them, so the ids stay distinct).
    for (int64_t j0 = 0; static_cast<int64_t>(heap.size()) < k && j0 < v; j0 += kChunk) {
      const int64_t len = std::min(kChunk, v - j0);
      const float* x = as_float(row + j0, len, buf, kernels);
      for (int64_t j = 0; j < len && static_cast<int64_t>(heap.size()) < k; ++j) {
        if (x[j] != x[j]) heap.push_back(Entry{x[j], j0 + j});
      }
    }
    const float log_z = ::logf(z);  // NaN if the row holds one: so is every log-prob
    for (int64_t j = 0; j < k; ++j) {
      out_idx[i * k + j] = heap[j].id;
      out_lp[i * k + j] = below(heap[j].value, m) * inv_t - log_z;
    }
  }
}

}  // namespace

DistillResult sparse_cpu(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                         double label_smoothing, const std::optional<at::Tensor>& offsets) {
  const SparseProblem prob =
      prepare_sparse(KDFUSED_SPARSE_NAMES, c10::DeviceType::CPU, label_smoothing, offsets);
  const TeacherEntries entries = prob.entries();
  const DistillProblem& base = prob.base;
  const int64_t* y = base.label_data();
  if (y) check_label_range(y, base.n, base.v, ignore_index);
  check_sparse_indices(entries, base.n, base.v);
  auto [hard, soft, grad] = allocate_outputs(base, compute_grad, grad_out);
  if (compute_grad && grad_out == nullptr) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const float scale = grad_scale ? grad_scale->item<float>() : 1.f;
  const SparseKernels& kernels = sparse_kernels();
  KDFUSED_DISPATCH_LOGITS(base.student.scalar_type(), "kdfused_sparse_cpu", [&] {
    using S = scalar_t;
    const SparseArgs<S> args{base.student.const_data_ptr<S>(),
                             base.student.stride(0),
                             base.v,
                             entries,
                             y,
                             base.params,
                             prob.tail,
                             prob.st_over_t,
                             scale,
                             hard.data_ptr<float>(),
                             soft.data_ptr<float>(),
                             compute_grad ? grad.data_ptr<S>() : nullptr};
    const int64_t grain = std::max<int64_t>(1, 16384 / base.v);
    at::parallel_for(0, base.n, grain,
                     [&](int64_t begin, int64_t end) { sparse_rows(args, kernels, begin, end); });
  });
  return {hard, soft, grad};
}

std::tuple<at::Tensor, at::Tensor> sparse_topk_cpu(const at::Tensor& logits, int64_t k,
                                                   double temperature) {
  const at::Tensor x = prepare_topk(logits, k, temperature, c10::DeviceType::CPU);
  const int64_t n = x.size(0), v = x.size(1);
  at::Tensor idx = at::empty({n, k}, x.options().dtype(at::kLong));
  at::Tensor lp = at::empty({n, k}, x.options().dtype(at::kFloat));
  const SparseKernels& kernels = sparse_kernels();
  const float inv_t = static_cast<float>(1.0 / temperature);
  KDFUSED_DISPATCH_LOGITS(x.scalar_type(), "kdfused_sparse_topk_cpu", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / v);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      topk_rows(data, x.stride(0), v, k, inv_t, idx.data_ptr<int64_t>(), lp.data_ptr<float>(),
                kernels, begin, end);
    });
  });
  return {idx, lp};
}

// ---- The vocab-parallel phases (sparse_shard_op.h): sparse_rows split where
// the ranks exchange a row's statistics, over one shard of each row ----

namespace {

template <typename S>
struct ShardArgs {
  const S* s;
  int64_t s_stride, v, k, offset;
  const int64_t* idx;
  const int64_t* y;
  LossParams p;
  float grad_scale;
};

// The statistics phase: each row's SparseShardStats over this shard and the
// logits at the kept ids it holds (out: [N, 8 + k]).
template <typename S>
void shard_stats_rows(const ShardArgs<S>& a, const SparseKernels& kernels, float* out,
                      int64_t begin, int64_t end) {
  const LossParams& p = a.p;
  const int64_t v = a.v, k = a.k;
  const SparseStatsFn stats = kernels.stats[static_cast<int>(z1_mode(p))];
  alignas(64) float sbuf[kChunk];
  alignas(64) float es[kChunk];
  std::vector<float> tail(v, 1.f);  // 0 at the row's kept ids in this shard, restored after
  for (int64_t i = begin; i < end; ++i) {
    float* row = out + i * (kSparseStatsFields + k);
    auto& o = *reinterpret_cast<SparseShardStats*>(row);
    float* kept_s = row + kSparseStatsFields;
    o.st = sparse_empty();
    o.sum_below = o.s_label = o.has_label = 0.f;
    o.columns = static_cast<float>(v);
    std::fill(kept_s, kept_s + k, 0.f);
    const int64_t label = a.y ? a.y[i] : -1;
    if (a.y && label == p.ignore_index) continue;
    const S* s = a.s + i * a.s_stride;
    const int64_t* ids = a.idx + i * k;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t at = ids[j] - a.offset;
      if (ids[j] < 0 || at < 0 || at >= v) continue;
      kept_s[j] = static_cast<float>(s[at]);
      tail[at] = 0.f;
    }
    for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
      const int64_t len = std::min(kChunk, v - j0);
      stats(o.st, as_float(s + j0, len, sbuf, kernels), tail.data() + j0, len, p.inv_t, es);
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t at = ids[j] - a.offset;
      if (ids[j] >= 0 && at >= 0 && at < v) tail[at] = 1.f;
    }
    if (a.y && p.smoothing) {
      for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
        const int64_t len = std::min(kChunk, v - j0);
        o.sum_below += kernels.sum_below(as_float(s + j0, len, sbuf, kernels), len, o.st.ms);
      }
    }
    if (a.y && label >= a.offset && label < a.offset + v) {
      o.s_label = static_cast<float>(s[label - a.offset]);
      o.has_label = 1.f;
    }
  }
}

// The gradient of a chunk's elements as tail elements, p_s h_g for the soft
// term, with p_s from the merged constants (the kept ids and the label are
// rewritten afterwards).
template <bool kHard, bool kSoft, HardQ kQ, bool kSmooth>
KDFUSED_INLINE void shard_grad_chunk(float* KD_R g, const float* KD_R s, int64_t len,
                                     float tail_coef, const RowConsts& c, const LossParams& p,
                                     const GradCoefs& gk) {
  for (int64_t k = 0; k < len; ++k) {
    const float ps = prob_s(s[k], c, p);
    g[k] = combine_grad<kHard, kSoft, kQ, kSmooth>(s[k], ps, ps * tail_coef, false, c, gk);
  }
}

using ShardGradFn = void (*)(float*, const float*, int64_t, float, const RowConsts&,
                             const LossParams&, const GradCoefs&);

#define KDFUSED_SHARD_GRADS(NAME, ...)                                                  \
  template <bool kHard, bool kSoft, HardQ kQ, bool kSmooth>                             \
  __VA_ARGS__ void NAME##_shard_grad(float* g, const float* s, int64_t len, float tail, \
                                     const RowConsts& c, const LossParams& p,           \
                                     const GradCoefs& k) {                              \
    shard_grad_chunk<kHard, kSoft, kQ, kSmooth>(g, s, len, tail, c, p, k);              \
  }                                                                                     \
  const ShardGradFn NAME##_shard_grads[kGradVariants] = KDFUSED_GRAD_VARIANTS(NAME##_shard_grad);

KDFUSED_SHARD_GRADS(baseline)
#if defined(__x86_64__)
KDFUSED_SHARD_GRADS(avx2, KDFUSED_AVX2)
#endif

const ShardGradFn* shard_grads() {
#if defined(__x86_64__)
  return cpu_capability() == "avx2" ? avx2_shard_grads : baseline_shard_grads;
#else
  return baseline_shard_grads;
#endif
}

// The gradient phase: this shard's gradient from the merged rows ([N, 12 +
// k]): every element as a tail element, then the kept ids this shard holds
// (their T dD/ds) and the label if it lies here and is not kept, as at the end
// of sparse_rows.
template <typename S>
void shard_grad_rows(const ShardArgs<S>& a, const SparseKernels& kernels, const float* merged,
                     S* grad, int64_t begin, int64_t end) {
  const LossParams& p = a.p;
  const int64_t v = a.v, k = a.k;
  const ShardGradFn chunk = shard_grads()[grad_variant(p)];
  const GradCoefs coefs = grad_coefs(p, a.grad_scale);
  alignas(64) float sbuf[kChunk];
  alignas(64) float gbuf[kChunk];
  for (int64_t i = begin; i < end; ++i) {
    const int64_t label = a.y ? a.y[i] : -1;
    S* g = grad + i * v;
    if (a.y && label == p.ignore_index) {
      std::fill(g, g + v, S(0));
      continue;
    }
    const S* s = a.s + i * a.s_stride;
    const float* row = merged + i * (kSparseMergedFields + k);
    const RowConsts& c = *reinterpret_cast<const RowConsts*>(row);
    const float tail_coef = row[kSparseMergedFields - 1];
    const float* x = row + kSparseMergedFields;
    for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
      const int64_t len = std::min(kChunk, v - j0);
      float* gf = gbuf;
      if constexpr (std::is_same_v<S, float>) gf = g + j0;
      chunk(gf, as_float(s + j0, len, sbuf, kernels), len, tail_coef, c, p, coefs);
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        kernels.store_bf16(reinterpret_cast<uint16_t*>(g + j0), gbuf, len);
      } else if constexpr (std::is_same_v<S, c10::Half>) {
        kernels.store_f16(reinterpret_cast<uint16_t*>(g + j0), gbuf, len);
      }
    }
    const int64_t* ids = a.idx + i * k;
    with_grad_variant(p, [&](auto variant_type) {
      using V = decltype(variant_type);
      constexpr auto element = combine_grad<V::kHasHard, V::kHasSoft, V::kHardQ, V::kSmoothed>;
      bool label_kept = false;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t at = ids[j] - a.offset;
        if (ids[j] < 0 || at < 0 || at >= v) continue;
        const float sv = static_cast<float>(s[at]);
        const bool is_label = ids[j] == label;
        label_kept = label_kept || is_label;
        g[at] = static_cast<S>(element(sv, ::expf(log_ps(sv, c, p)), x[j], is_label, c, coefs));
      }
      const int64_t at = label - a.offset;
      if (a.y && !label_kept && at >= 0 && at < v) {
        const float sy = static_cast<float>(s[at]);
        const float ps = prob_s(sy, c, p);
        g[at] = static_cast<S>(element(sy, ps, ps * tail_coef, true, c, coefs));
      }
    });
  }
}

// Runs rows(args, begin, end) over the problem's rows in parallel tasks.
template <typename F>
void parallel_shard_rows(const SparseProblem& prob, int64_t offset, F&& rows) {
  const DistillProblem& base = prob.base;
  const float scale = base.grad_scale ? base.grad_scale->item<float>() : 1.f;
  KDFUSED_DISPATCH_LOGITS(base.student.scalar_type(), "kdfused_sparse_shard_cpu", [&] {
    const ShardArgs<scalar_t> args{base.student.const_data_ptr<scalar_t>(),
                                   base.student.stride(0),
                                   base.v,
                                   prob.k,
                                   offset,
                                   prob.indices.const_data_ptr<int64_t>(),
                                   base.label_data(),
                                   base.params,
                                   scale};
    const int64_t grain = std::max<int64_t>(1, 16384 / base.v);
    at::parallel_for(0, base.n, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
}

}  // namespace

at::Tensor sparse_shard_stats_cpu(KDFUSED_SPARSE_PHASE_ARGS) {
  const SparseProblem prob = prepare_sparse_shard(KDFUSED_SPARSE_PHASE_NAMES, c10::DeviceType::CPU);
  if (const int64_t* y = prob.base.label_data()) {
    check_label_range(y, prob.base.n, vocab, ignore_index);
  }
  at::Tensor out = at::empty({prob.base.n, kSparseStatsFields + prob.k},
                             prob.base.student.options().dtype(at::kFloat));
  const SparseKernels& kernels = sparse_kernels();
  float* data = out.data_ptr<float>();
  parallel_shard_rows(prob, column_offset, [&](const auto& args, int64_t begin, int64_t end) {
    shard_stats_rows(args, kernels, data, begin, end);
  });
  return out;
}

at::Tensor sparse_shard_grad_cpu(KDFUSED_SPARSE_PHASE_ARGS, const at::Tensor& merged) {
  const SparseProblem prob = prepare_sparse_shard(KDFUSED_SPARSE_PHASE_NAMES, c10::DeviceType::CPU);
  check_merged(merged, prob);
  at::Tensor grad = at::empty({prob.base.n, prob.base.v}, prob.base.student.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const SparseKernels& kernels = sparse_kernels();
  const float* m = merged.const_data_ptr<float>();
  parallel_shard_rows(prob, column_offset, [&](const auto& args, int64_t begin, int64_t end) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(args.s)>>;
    shard_grad_rows(args, kernels, m, grad.data_ptr<S>(), begin, end);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_shard_merge_cpu(KDFUSED_SPARSE_MERGE_ARGS) {
  const SparseMergeProblem prob = prepare_sparse_merge(
      shard_stats, indices, logprobs, labels, temperature, store_temperature, tail, alpha,
      divergence, beta, ignore_index, scale_by_t2, label_smoothing, c10::DeviceType::CPU);
  const int64_t w = prob.w, n = prob.n, k = prob.k;
  const float* stats = shard_stats.const_data_ptr<float>();
  const ContiguousLabels y(labels);
  const int64_t* idx = prob.indices.const_data_ptr<int64_t>();
  if (n > 0) {
    const int64_t v = sparse_row_vocab(stats, 0, n, w, k);
    if (y.data()) check_label_range(y.data(), n, v, ignore_index);
    const TeacherEntries padded{idx,
                                prob.logprobs.const_data_ptr<float>(),
                                nullptr,
                                k,
                                IdType::kInt64,
                                LogprobType::kFloat};
    check_sparse_indices(padded, n, v);
  }
  const auto opts = shard_stats.options();
  at::Tensor merged = at::empty({n, kSparseMergedFields + k}, opts);
  at::Tensor hard = at::empty({n}, opts);
  at::Tensor soft = at::empty({n}, opts);
  const float* lp = prob.logprobs.const_data_ptr<float>();
  float* out = merged.data_ptr<float>();
  float* hard_data = hard.data_ptr<float>();
  float* soft_data = soft.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, w * (k + 8)));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> lb(k);
    for (int64_t i = begin; i < end; ++i) {
      sparse_merge_row(i, n, w, k, stats, idx, lp, y.data(), prob.params, label_smoothing,
                       prob.tail, prob.st_over_t, lb.data(), out, hard_data, soft_data);
    }
  });
  return {merged, hard, soft};
}

}  // namespace kdfused
