// The C++ CPU kernel: one task per block of rows (at::parallel_for), and per
// row an online softmax over the logits streamed in chunks (pass 1: maxima,
// normalisers and the KL sums), a second pass for JSD's mixture sums, and the
// gradient pass. All accumulation is float32; the math is kdfused_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../distill_op.h"
#include "../parallel_op.h"
#include "cpu_common.h"

namespace kdfused {
namespace {

using namespace cpu;  // NOLINT: the shared chunk helpers

// Maxima of s and t over a chunk (NaN skipped, like max_keep).
KDFUSED_INLINE void chunk_max(const float* s, const float* t, int64_t len, float& cms, float& cmt) {
  // A GCC vector type: left to itself the compiler kept 16 scalar maxima
  // (vmaxss), ~12% of pass 1.
  using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));
  Lanes ms, mt;
  for (int l = 0; l < kLanes; ++l) ms[l] = mt[l] = neg_inf();
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    Lanes x, y;
    std::memcpy(&x, s + k, sizeof(x));
    std::memcpy(&y, t + k, sizeof(y));
    ms = x > ms ? x : ms;  // max_keep, lane by lane
    mt = y > mt ? y : mt;
  }
  cms = cmt = neg_inf();
  for (int l = 0; l < kLanes; ++l) {
    cms = max_keep(cms, ms[l]);
    cmt = max_keep(cmt, mt[l]);
  }
  for (; k < len; ++k) {
    cms = max_keep(cms, s[k]);
    cmt = max_keep(cmt, t[k]);
  }
}

// Adds a chunk to a state whose anchors already cover it, keeping the exps.
// Only the weighted sum divergence kD reads is formed (sums_for); kEnt: also
// the student entropy's sum hs (entropy_term), at the same anchor ms.
template <Divergence kD, Z1 kZ1, bool kFinite, bool kEnt>
KDFUSED_INLINE void add_chunk(RowStats& st, const float* KD_R s, const float* KD_R t, int64_t len,
                              float inv_t, float* KD_R es, float* KD_R et, float& hs_row) {
  constexpr WeightedSums kSums = sums_for(kD);
  const float ms = st.ms, mt = st.mt, ref = st.ref;
  float zs[kLanes] = {}, zt[kLanes] = {}, z1[kLanes] = {}, ws[kLanes] = {}, wt[kLanes] = {};
  float hs[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const ScaledExps e = accumulate_terms<kSums.ws, kSums.wt>(
          s[k + l], t[k + l], ms, mt, ref, inv_t, kZ1, zs[l], zt[l], z1[l], ws[l], wt[l], kFinite);
      if constexpr (kEnt) hs[l] += entropy_term(s[k + l], ms, e.es, kFinite);
      es[k + l] = e.es;
      et[k + l] = e.et;
    }
  }
  for (int l = 0; k + l < len; ++l) {
    const ScaledExps e = accumulate_terms<kSums.ws, kSums.wt>(
        s[k + l], t[k + l], ms, mt, ref, inv_t, kZ1, zs[l], zt[l], z1[l], ws[l], wt[l], kFinite);
    if constexpr (kEnt) hs[l] += entropy_term(s[k + l], ms, e.es, kFinite);
    es[k + l] = e.es;
    et[k + l] = e.et;
  }
  // Same anchors everywhere: merging the lanes into the row is plain addition.
  st.zs += lane_sum(zs);
  st.zt += lane_sum(zt);
  st.z1 += lane_sum(z1);
  st.ws += lane_sum(ws);
  st.wt += lane_sum(wt);
  if constexpr (kEnt) hs_row += lane_sum(hs);
}

// Pass 1 for one chunk: raise the anchors, then add every element, keeping
// each element's exp((s - ms) / T), exp((t - mt) / T) in es, et (for this
// chunk's anchors; the later passes scale them to p_s, p_t instead of taking
// more exps).
template <Divergence kD, Z1 kZ1, bool kEnt>
KDFUSED_INLINE void stats_chunk(RowStats& st, const float* s, const float* t, int64_t len,
                                float inv_t, float* es, float* et, float& hs) {
  float cms, cmt;
  chunk_max(s, t, len, cms, cmt);
  float t_at = neg_inf();
  if (cms > st.ms) {  // a new row maximum: the teacher logit at its first position
    for (int64_t k = 0; k < len; ++k) {
      if (s[k] == cms) {
        t_at = t[k];
        break;
      }
    }
  }
  const float ms_old = st.ms, zs_old = st.zs;
  stats_raise(st, cms, cmt, t_at, inv_t);
  if constexpr (kEnt) hs = entropy_moved(hs, zs_old, ms_old, st.ms, inv_t);
  // Finite anchors (every chunk after the first finite logits) skip below()'s selects.
  if (anchors_finite(st)) {
    add_chunk<kD, kZ1, true, kEnt>(st, s, t, len, inv_t, es, et, hs);
  } else {
    add_chunk<kD, kZ1, false, kEnt>(st, s, t, len, inv_t, es, et, hs);
  }
}

// How a chunk's kept exps become probabilities: p_s = es * fs, p_t = et * ft.
struct ChunkScale {
  float fs, ft;
};

KDFUSED_INLINE void jsd_lane(float s, float t, float ps, float pt, const RowConsts& c,
                             const LossParams& p, float& tm, float& sm, float& d) {
  const JsdElement e = jsd_element(s, t, ps, pt, c, p);
  JsdSums one{tm, sm};
  jsd_accumulate(one, e);
  tm = one.kl_tm;
  sm = one.kl_sm;
  d = e.gap.ds;
}

// kLanes logits from x as floats: x itself, or bfloat16 widened into buf
// before the lanes' loop (widened inside it, GCC sized that loop's vectors
// for the 16-bit input and ran JSD's pass 4 floats wide: jsd took 1.3x as long).
KDFUSED_INLINE const float* lanes(const float* x, float*) { return x; }
KDFUSED_INLINE const float* lanes(const uint16_t* x, float* buf) {
  for (int l = 0; l < kLanes; ++l) buf[l] = widen(x[l]);
  return buf;
}

// JSD's pass for one chunk. It overwrites et with log p_s - log m, all the
// gradient pass needs besides p_s (so that pass takes no log). L: float, or
// bfloat16 bits read in place: converting them into a buffer first, as pass 1
// does, took about a fifth of this pass's time at bf16 V = 128k (perf).
template <typename L>
KDFUSED_INLINE void jsd_chunk(JsdSums& acc, const L* KD_R s, const L* KD_R t, const float* KD_R es,
                              float* KD_R et, int64_t len, ChunkScale f, const RowConsts& c,
                              const LossParams& p) {
  float tm[kLanes] = {}, sm[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    float sbuf[kLanes], tbuf[kLanes];
    const float* sf = lanes(s + k, sbuf);
    const float* tf = lanes(t + k, tbuf);
    for (int l = 0; l < kLanes; ++l) {
      const int64_t j = k + l;
      jsd_lane(sf[l], tf[l], es[j] * f.fs, et[j] * f.ft, c, p, tm[l], sm[l], et[j]);
    }
  }
  for (int l = 0; k + l < len; ++l) {
    const int64_t j = k + l;
    jsd_lane(widen(s[j]), widen(t[j]), es[j] * f.fs, et[j] * f.ft, c, p, tm[l], sm[l], et[j]);
  }
  acc = jsd_merge(acc, JsdSums{lane_sum(tm), lane_sum(sm)});
}

// The gradient of one chunk (the label's own element is fixed up later). For
// JSD with a soft term, et holds log p_s - log m (jsd_chunk).
template <Divergence D, bool kHard, bool kSoft, HardQ kQ, bool kSmooth>
KDFUSED_INLINE void grad_chunk(float* KD_R g, const float* KD_R s, const float* KD_R t,
                               const float* KD_R es, const float* KD_R et, int64_t len,
                               ChunkScale f, const RowConsts& c, const LossParams& p,
                               const GradCoefs& gk) {
  for (int64_t k = 0; k < len; ++k) {
    const float ps = es[k] * f.fs;
    if (D == Divergence::kJSD && kSoft) {
      g[k] = combine_grad<kHard, kSoft, kQ, kSmooth>(s[k], ps, jsd_grad(ps, et[k], c, p), false, c,
                                                     gk);
    } else {
      g[k] = grad_from_probs<D, kHard, kSoft, kQ, kSmooth>(s[k], t[k], ps, et[k] * f.ft, false, c,
                                                           p, gk);
    }
  }
}

// The vocab-parallel gradient phase for one chunk: every element from its
// logits and the merged row constants (no kept exps: the statistics phase ran
// in another call), the label's own element fixed up by the caller.
template <Divergence D, bool kHard, bool kSoft, HardQ kQ, bool kSmooth>
KDFUSED_INLINE void grad_logits_chunk(float* KD_R g, const float* KD_R s, const float* KD_R t,
                                      int64_t len, const RowConsts& c, const LossParams& p,
                                      const GradCoefs& gk) {
  for (int64_t k = 0; k < len; ++k) {
    g[k] = grad_element_as<D, kHard, kSoft, kQ, kSmooth>(s[k], t[k], false, c, p, gk);
  }
}

// The vocab-parallel JSD sums of one chunk, from the merged constants.
KDFUSED_INLINE void jsd_sums_chunk(JsdSums& acc, const float* KD_R s, const float* KD_R t,
                                   int64_t len, const RowConsts& c, const LossParams& p) {
  float tm[kLanes] = {}, sm[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      JsdSums one{tm[l], sm[l]};
      jsd_accumulate(one, s[k + l], t[k + l], c, p);
      tm[l] = one.kl_tm;
      sm[l] = one.kl_sm;
    }
  }
  for (int l = 0; k + l < len; ++l) {
    JsdSums one{tm[l], sm[l]};
    jsd_accumulate(one, s[k + l], t[k + l], c, p);
    tm[l] = one.kl_tm;
    sm[l] = one.kl_sm;
  }
  acc = jsd_merge(acc, JsdSums{lane_sum(tm), lane_sum(sm)});
}

// The chunk kernels of one instruction set, as a table: the row loop below
// picks one table at run time. Each entry is compiled once per instruction
// set (the KDFUSED_INLINE bodies take the entry's target). Chunks are
// converted to float first, by the table's 16-bit loads, and gradients stored
// by its 16-bit stores; only JSD's pass also reads bfloat16 logits in place
// (jsd_bf16, for a student and teacher both bfloat16).
using StatsFn = void (*)(RowStats&, const float*, const float*, int64_t, float, float*, float*,
                         float&);
template <typename L>
using JsdFn = void (*)(JsdSums&, const L*, const L*, const float*, float*, int64_t, ChunkScale,
                       const RowConsts&, const LossParams&);
using GradFn = void (*)(float*, const float*, const float*, const float*, const float*, int64_t,
                        ChunkScale, const RowConsts&, const LossParams&, const GradCoefs&);
using GradLogitsFn = void (*)(float*, const float*, const float*, int64_t, const RowConsts&,
                              const LossParams&, const GradCoefs&);
using JsdSumsFn = void (*)(JsdSums&, const float*, const float*, int64_t, const RowConsts&,
                           const LossParams&);

struct ChunkKernels {
  StatsFn stats[2][3][3];  // [student entropy][divergence][Z1 mode]
  JsdFn<float> jsd;
  JsdFn<uint16_t> jsd_bf16;                    // both models' logits bfloat16
  GradFn grad[3][kGradVariants];               // [divergence][grad_variant]
  SumFn sum_below;                             // label smoothing's row sum
  GradLogitsFn grad_logits[3][kGradVariants];  // the vocab-parallel phases
  JsdSumsFn jsd_sums;
  Store16Fn store_bf16;
  Load16Fn load_bf16;
  Load16Fn load_f16;
  Store16Fn store_f16;
};

#define KDFUSED_STATS(NAME, D, E) \
  {NAME##_stats<D, Z1::kNone, E>, NAME##_stats<D, Z1::kExp, E>, NAME##_stats<D, Z1::kSquare, E>}
#define KDFUSED_STATS_ALL(NAME, E)                                                                 \
  {KDFUSED_STATS(NAME, Divergence::kForwardKL, E), KDFUSED_STATS(NAME, Divergence::kReverseKL, E), \
   KDFUSED_STATS(NAME, Divergence::kJSD, E)}

#define KDFUSED_GRADS(NAME, D) KDFUSED_GRAD_VARIANTS(NAME##_grad, D, )
#define KDFUSED_GRAD_LOGITS(NAME, D) KDFUSED_GRAD_VARIANTS(NAME##_grad_logits, D, )

#define KDFUSED_CHUNK_KERNELS(NAME, ...)                                                         \
  template <Divergence kD, Z1 kZ1, bool kEnt>                                                    \
  __VA_ARGS__ void NAME##_stats(RowStats& st, const float* s, const float* t, int64_t len,       \
                                float inv_t, float* es, float* et, float& hs) {                  \
    stats_chunk<kD, kZ1, kEnt>(st, s, t, len, inv_t, es, et, hs);                                \
  }                                                                                              \
  template <typename L>                                                                          \
  __VA_ARGS__ void NAME##_jsd(JsdSums& acc, const L* s, const L* t, const float* es, float* et,  \
                              int64_t len, ChunkScale f, const RowConsts& c,                     \
                              const LossParams& p) {                                             \
    jsd_chunk(acc, s, t, es, et, len, f, c, p);                                                  \
  }                                                                                              \
  template <Divergence D, bool kHard, bool kSoft, HardQ kQ, bool kSmooth>                        \
  __VA_ARGS__ void NAME##_grad(float* g, const float* s, const float* t, const float* es,        \
                               const float* et, int64_t len, ChunkScale f, const RowConsts& c,   \
                               const LossParams& p, const GradCoefs& k) {                        \
    grad_chunk<D, kHard, kSoft, kQ, kSmooth>(g, s, t, es, et, len, f, c, p, k);                  \
  }                                                                                              \
  __VA_ARGS__ float NAME##_sum_below(const float* s, int64_t len, float ms) {                    \
    return sum_below_chunk(s, len, ms);                                                          \
  }                                                                                              \
  template <Divergence D, bool kHard, bool kSoft, HardQ kQ, bool kSmooth>                        \
  __VA_ARGS__ void NAME##_grad_logits(float* g, const float* s, const float* t, int64_t len,     \
                                      const RowConsts& c, const LossParams& p,                   \
                                      const GradCoefs& k) {                                      \
    grad_logits_chunk<D, kHard, kSoft, kQ, kSmooth>(g, s, t, len, c, p, k);                      \
  }                                                                                              \
  __VA_ARGS__ void NAME##_jsd_sums(JsdSums& acc, const float* s, const float* t, int64_t len,    \
                                   const RowConsts& c, const LossParams& p) {                    \
    jsd_sums_chunk(acc, s, t, len, c, p);                                                        \
  }                                                                                              \
  const ChunkKernels NAME##_kernels = {                                                          \
      {KDFUSED_STATS_ALL(NAME, false), KDFUSED_STATS_ALL(NAME, true)},                           \
      NAME##_jsd<float>,                                                                         \
      NAME##_jsd<uint16_t>,                                                                      \
      {KDFUSED_GRADS(NAME, Divergence::kForwardKL), KDFUSED_GRADS(NAME, Divergence::kReverseKL), \
       KDFUSED_GRADS(NAME, Divergence::kJSD)},                                                   \
      NAME##_sum_below,                                                                          \
      {KDFUSED_GRAD_LOGITS(NAME, Divergence::kForwardKL),                                        \
       KDFUSED_GRAD_LOGITS(NAME, Divergence::kReverseKL),                                        \
       KDFUSED_GRAD_LOGITS(NAME, Divergence::kJSD)},                                             \
      NAME##_jsd_sums,                                                                           \
      NAME##_store_bf16,                                                                         \
      NAME##_load_bf16,                                                                          \
      NAME##_load_f16,                                                                           \
      NAME##_store_f16};

// Baseline x86-64 (SSE2), for every CPU; AVX2 + FMA + F16C where the CPU has them.
KDFUSED_CHUNK_KERNELS(baseline)
#if defined(__x86_64__)
KDFUSED_CHUNK_KERNELS(avx2, KDFUSED_AVX2)
#endif

// One problem's arguments to the row loop.
template <typename S, typename Tt>
struct RowsArgs {
  const S* s;
  const Tt* t;
  int64_t s_stride, t_stride, v;
  const int64_t* y;
  LossParams p;
  float grad_scale;
  float* hard;
  float* soft;
  S* grad;
  float* entropy;  // the student entropy rows, or nullptr: not asked for
};

// The rows [begin, end), fully: pass 1, JSD's pass, the losses and the
// gradient. One row's kept exps (2 V floats) stay in this task's cache.
template <typename S, typename Tt>
void row_range(const RowsArgs<S, Tt>& a, const ChunkKernels& kernels, int64_t begin, int64_t end) {
  const LossParams& p = a.p;
  const int64_t v = a.v;
  const int64_t chunks = (v + kChunk - 1) / kChunk;
  const StatsFn stats =
      kernels.stats[a.entropy != nullptr][static_cast<int>(p.div)][static_cast<int>(z1_mode(p))];
  const int variant = grad_variant(p);
  const GradFn grad = kernels.grad[static_cast<int>(p.div)][variant];
  // The gradient pass works from the kept exps; it reads the logits only for
  // reverse KL's log-ratio and for the hard term's softmax when T = 2 does not
  // give it from p_s (grad_from_probs, combine_grad).
  const bool reads_t = p.div == Divergence::kReverseKL;
  const bool reads_s = reads_t || hard_from_logits(variant);
  const GradCoefs coefs = grad_coefs(p, a.grad_scale);
  alignas(64) float sbuf[kChunk];
  alignas(64) float tbuf[kChunk];
  alignas(64) float gbuf[kChunk];
  // The gradient may overwrite the student logits (distill_forward_inplace):
  // then every chunk's gradient goes through gbuf, and is stored only once its
  // label element is done, the last read of that chunk's logits.
  const bool in_place = static_cast<const void*>(a.grad) == static_cast<const void*>(a.s);
  std::vector<float> kept(2 * v);  // es, then et
  float* es = kept.data();
  float* et = kept.data() + v;
  std::vector<float> anchors(2 * chunks);  // each chunk's (ms, mt)
  for (int64_t i = begin; i < end; ++i) {
    const int64_t label = a.y ? a.y[i] : -1;
    S* g = a.grad ? a.grad + i * v : nullptr;
    if (a.y && label == p.ignore_index) {
      a.hard[i] = 0.f;
      a.soft[i] = 0.f;
      if (a.entropy) a.entropy[i] = 0.f;
      if (g) std::fill(g, g + v, S(0));
      continue;
    }
    const S* s = a.s + i * a.s_stride;
    const Tt* t = a.t + i * a.t_stride;

    RowStats st = stats_empty();
    float hs = 0.f;  // the entropy's sum (only with a.entropy)
    for (int64_t j0 = 0, b = 0; j0 < v; j0 += kChunk, ++b) {
      const int64_t len = std::min(kChunk, v - j0);
      stats(st, as_float(s + j0, len, sbuf, kernels), as_float(t + j0, len, tbuf, kernels), len,
            p.inv_t, es + j0, et + j0, hs);
      anchors[2 * b] = st.ms;
      anchors[2 * b + 1] = st.mt;
    }
    // Before the gradient pass, which may overwrite the logits.
    if (a.entropy) a.entropy[i] = row_entropy(hs, st.zs, p.inv_t);
    RowConsts c = row_consts(st, p);
    const float inv_zs = 1.f / st.zs;
    const float inv_zt = 1.f / st.zt;
    const auto scale_of = [&](int64_t b) {
      return ChunkScale{shifted_exp(anchors[2 * b], st.ms, p.inv_t) * inv_zs,
                        shifted_exp(anchors[2 * b + 1], st.mt, p.inv_t) * inv_zt};
    };
    if (p.div == Divergence::kJSD) {
      JsdSums acc{0.f, 0.f};
      for (int64_t j0 = 0, b = 0; j0 < v; j0 += kChunk, ++b) {
        const int64_t len = std::min(kChunk, v - j0);
        if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<Tt, c10::BFloat16>) {
          kernels.jsd_bf16(acc, reinterpret_cast<const uint16_t*>(s + j0),
                           reinterpret_cast<const uint16_t*>(t + j0), es + j0, et + j0, len,
                           scale_of(b), c, p);
        } else {
          kernels.jsd(acc, as_float(s + j0, len, sbuf, kernels),
                      as_float(t + j0, len, tbuf, kernels), es + j0, et + j0, len, scale_of(b), c,
                      p);
        }
      }
      jsd_finish(c, acc, p);
    }
    if (a.y && p.smoothing) {  // its row sum: the row was just read, it is in cache
      float sum = 0.f;
      for (int64_t j0 = 0; j0 < v; j0 += kChunk) {
        const int64_t len = std::min(kChunk, v - j0);
        sum += kernels.sum_below(as_float(s + j0, len, sbuf, kernels), len, c.ms);
      }
      c.sum_below = sum;
    }
    a.hard[i] = a.y ? hard_loss(static_cast<float>(s[label]), c, p) : 0.f;
    a.soft[i] = p.soft_scale * c.div;
    if (!g) continue;
    for (int64_t j0 = 0, b = 0; j0 < v; j0 += kChunk, ++b) {
      const int64_t len = std::min(kChunk, v - j0);
      // Only what this gradient reads is converted (nullptr otherwise: a
      // read would fault, not go wrong quietly).
      const float* sf = reads_s ? as_float(s + j0, len, sbuf, kernels) : nullptr;
      const float* tf = reads_t ? as_float(t + j0, len, tbuf, kernels) : nullptr;
      // A float gradient is written straight into its row, others (and one
      // that overwrites the logits) through gbuf.
      float* gf;
      if constexpr (std::is_same_v<S, float>) {
        gf = in_place ? gbuf : g + j0;
      } else {
        gf = gbuf;
      }
      grad(gf, sf, tf, es + j0, et + j0, len, scale_of(b), c, p, coefs);
      if (label >= j0 && label < j0 + len) {  // the label's own element
        gf[label - j0] = grad_element(static_cast<float>(s[label]), static_cast<float>(t[label]),
                                      true, c, p, coefs);
      }
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        kernels.store_bf16(reinterpret_cast<uint16_t*>(g + j0), gbuf, len);
      } else if constexpr (std::is_same_v<S, c10::Half>) {
        kernels.store_f16(reinterpret_cast<uint16_t*>(g + j0), gbuf, len);
      } else {
        static_assert(std::is_same_v<S, float>, "float, bfloat16 or float16 gradients");
        if (in_place) std::memcpy(g + j0, gbuf, len * sizeof(float));
      }
    }
  }
}

// ---- The vocab-parallel phases (parallel_op.h): the same chunk kernels, a
// row's statistics, JSD sums and gradient in separate calls ----

// The statistics phase: each row's ShardStats over this shard.
template <typename S, typename Tt>
void stats_rows(const RowsArgs<S, Tt>& a, const ChunkKernels& kernels, int64_t offset,
                ShardStats* out, int64_t begin, int64_t end) {
  const LossParams& p = a.p;
  const StatsFn stats = kernels.stats[0][static_cast<int>(p.div)][static_cast<int>(z1_mode(p))];
  alignas(64) float sbuf[kChunk], tbuf[kChunk], es[kChunk], et[kChunk];
  float unused_hs = 0.f;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t label = a.y ? a.y[i] : -1;
    ShardStats& o = out[i];
    o.st = stats_empty();
    o.sum_below = o.s_label = o.has_label = 0.f;
    o.columns = static_cast<float>(a.v);
    if (a.y && label == p.ignore_index) continue;
    const S* s = a.s + i * a.s_stride;
    const Tt* t = a.t + i * a.t_stride;
    for (int64_t j0 = 0; j0 < a.v; j0 += kChunk) {
      const int64_t len = std::min(kChunk, a.v - j0);
      stats(o.st, as_float(s + j0, len, sbuf, kernels), as_float(t + j0, len, tbuf, kernels), len,
            p.inv_t, es, et, unused_hs);
    }
    if (a.y && p.smoothing) {
      for (int64_t j0 = 0; j0 < a.v; j0 += kChunk) {
        const int64_t len = std::min(kChunk, a.v - j0);
        o.sum_below += kernels.sum_below(as_float(s + j0, len, sbuf, kernels), len, o.st.ms);
      }
    }
    if (a.y && label >= offset && label < offset + a.v) {
      o.s_label = static_cast<float>(s[label - offset]);
      o.has_label = 1.f;
    }
  }
}

// JSD's sums over this shard from the merged constants.
template <typename S, typename Tt>
void jsd_rows(const RowsArgs<S, Tt>& a, const ChunkKernels& kernels, const RowConsts* consts,
              float* out, int64_t begin, int64_t end) {
  alignas(64) float sbuf[kChunk], tbuf[kChunk];
  for (int64_t i = begin; i < end; ++i) {
    JsdSums acc{0.f, 0.f};
    if (!(a.y && a.y[i] == a.p.ignore_index)) {
      const S* s = a.s + i * a.s_stride;
      const Tt* t = a.t + i * a.t_stride;
      for (int64_t j0 = 0; j0 < a.v; j0 += kChunk) {
        const int64_t len = std::min(kChunk, a.v - j0);
        kernels.jsd_sums(acc, as_float(s + j0, len, sbuf, kernels),
                         as_float(t + j0, len, tbuf, kernels), len, consts[i], a.p);
      }
    }
    out[2 * i] = acc.kl_tm;
    out[2 * i + 1] = acc.kl_sm;
  }
}

// The gradient phase: this shard's gradient from the merged constants.
template <typename S, typename Tt>
void grad_rows(const RowsArgs<S, Tt>& a, const ChunkKernels& kernels, const RowConsts* consts,
               int64_t offset, int64_t begin, int64_t end) {
  const LossParams& p = a.p;
  const GradLogitsFn grad = kernels.grad_logits[static_cast<int>(p.div)][grad_variant(p)];
  const GradCoefs coefs = grad_coefs(p, a.grad_scale);
  alignas(64) float sbuf[kChunk], tbuf[kChunk], gbuf[kChunk];
  for (int64_t i = begin; i < end; ++i) {
    const int64_t label = a.y ? a.y[i] : -1;
    S* g = a.grad + i * a.v;
    if (a.y && label == p.ignore_index) {
      std::fill(g, g + a.v, S(0));
      continue;
    }
    const S* s = a.s + i * a.s_stride;
    const Tt* t = a.t + i * a.t_stride;
    const RowConsts& c = consts[i];
    for (int64_t j0 = 0; j0 < a.v; j0 += kChunk) {
      const int64_t len = std::min(kChunk, a.v - j0);
      float* gf = gbuf;
      if constexpr (std::is_same_v<S, float>) gf = g + j0;
      grad(gf, as_float(s + j0, len, sbuf, kernels), as_float(t + j0, len, tbuf, kernels), len, c,
           p, coefs);
      const int64_t at = label - offset - j0;  // the label's column in this chunk
      if (a.y && at >= 0 && at < len) {
        gf[at] = grad_element(static_cast<float>(s[j0 + at]), static_cast<float>(t[j0 + at]), true,
                              c, p, coefs);
      }
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        kernels.store_bf16(reinterpret_cast<uint16_t*>(g + j0), gbuf, len);
      } else if constexpr (std::is_same_v<S, c10::Half>) {
        kernels.store_f16(reinterpret_cast<uint16_t*>(g + j0), gbuf, len);
      }
    }
  }
}

const ChunkKernels& chunk_kernels() {
#if defined(__x86_64__)
  return cpu_capability() == "avx2" ? avx2_kernels : baseline_kernels;
#else
  return baseline_kernels;
#endif
}

// Runs rows(args, kernels, begin, end) over the rows [0, N) in parallel
// tasks, args the problem's RowsArgs (for its dtypes) with the outputs hard,
// soft, grad and entropy (nullptr: not written by this call).
template <typename F>
void parallel_rows(const DistillProblem& prob, float* hard, float* soft, const at::Tensor* grad,
                   F&& rows, float* entropy = nullptr) {
  const ChunkKernels& kernels = chunk_kernels();
  const float scale = prob.grad_scale ? prob.grad_scale->item<float>() : 1.f;
  dispatch_pair(prob, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    const RowsArgs<S, Tt> args{prob.student.const_data_ptr<S>(),
                               prob.teacher.const_data_ptr<Tt>(),
                               prob.student.stride(0),
                               prob.teacher.stride(0),
                               prob.v,
                               prob.label_data(),
                               prob.params,
                               scale,
                               hard,
                               soft,
                               grad ? grad->data_ptr<S>() : nullptr,
                               entropy};
    // Enough rows per task to amortise the scheduling for small V.
    const int64_t grain = std::max<int64_t>(1, 16384 / prob.v);
    at::parallel_for(0, prob.n, grain,
                     [&](int64_t begin, int64_t end) { rows(args, kernels, begin, end); });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_inplace_cpu(
    KDFUSED_KERNEL_ARGS_MUTABLE, double label_smoothing, bool student_entropy) {
  TORCH_CHECK_VALUE(student.is_contiguous(),
                    "kdfused: distill_forward_inplace overwrites the student logits with their "
                    "gradient, so they must be contiguous, got ",
                    text(student), " with strides ", text(student.strides()));
  auto result = distill_cpu(KDFUSED_KERNEL_NAMES, true, &student, label_smoothing, student_entropy);
  return {std::get<0>(result), std::get<1>(result), std::get<3>(result)};
}

std::string cpu_capability() {
  const char* forced = std::getenv("KDFUSED_CPU_CAPABILITY");
  if (forced && std::string(forced) == "default") return "default";
#if defined(__x86_64__)
  __builtin_cpu_init();
  // Every AVX2 CPU has F16C too, but a VM may hide it.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c")
             ? "avx2"
             : "default";
#else
  return "default";
#endif
}

DenseResult distill_cpu(KDFUSED_KERNEL_ARGS, bool compute_grad, const at::Tensor* grad_out,
                        double label_smoothing, bool student_entropy) {
  const DistillProblem prob =
      prepare_problem(KDFUSED_KERNEL_NAMES, c10::DeviceType::CPU, label_smoothing);
  if (const int64_t* y = prob.label_data()) check_label_range(y, prob.n, prob.v, ignore_index);
  auto [hard, soft, grad] = allocate_outputs(prob, compute_grad, grad_out);
  at::Tensor entropy = allocate_entropy(prob, student_entropy);
  // A buffer of the caller's is written before: its pages are there already.
  if (compute_grad && grad_out == nullptr) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  parallel_rows(
      prob, hard.data_ptr<float>(), soft.data_ptr<float>(), compute_grad ? &grad : nullptr,
      [](const auto& args, const ChunkKernels& kernels, int64_t begin, int64_t end) {
        row_range(args, kernels, begin, end);
      },
      student_entropy ? entropy.data_ptr<float>() : nullptr);
  return {hard, soft, grad, entropy};
}

at::Tensor distill_stats_cpu(KDFUSED_PHASE_ARGS) {
  const DistillProblem prob = prepare_shard(KDFUSED_PHASE_NAMES, c10::DeviceType::CPU);
  if (const int64_t* y = prob.label_data()) check_label_range(y, prob.n, vocab, ignore_index);
  at::Tensor out = at::empty({prob.n, 12}, prob.student.options().dtype(at::kFloat));
  auto* stats = reinterpret_cast<ShardStats*>(out.data_ptr<float>());
  parallel_rows(prob, nullptr, nullptr, nullptr,
                [&](const auto& args, const ChunkKernels& kernels, int64_t begin, int64_t end) {
                  stats_rows(args, kernels, column_offset, stats, begin, end);
                });
  return out;
}

at::Tensor distill_jsd_sums_cpu(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob = prepare_shard(KDFUSED_PHASE_NAMES, c10::DeviceType::CPU);
  check_consts(consts, prob);
  at::Tensor out = at::empty({prob.n, 2}, prob.student.options().dtype(at::kFloat));
  const auto* c = reinterpret_cast<const RowConsts*>(consts.const_data_ptr<float>());
  parallel_rows(prob, nullptr, nullptr, nullptr,
                [&](const auto& args, const ChunkKernels& kernels, int64_t begin, int64_t end) {
                  jsd_rows(args, kernels, c, out.data_ptr<float>(), begin, end);
                });
  return out;
}

at::Tensor distill_grad_cpu(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob = prepare_shard(KDFUSED_PHASE_NAMES, c10::DeviceType::CPU);
  check_consts(consts, prob);
  at::Tensor grad = at::empty({prob.n, prob.v}, prob.student.options());
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const auto* c = reinterpret_cast<const RowConsts*>(consts.const_data_ptr<float>());
  parallel_rows(prob, nullptr, nullptr, &grad,
                [&](const auto& args, const ChunkKernels& kernels, int64_t begin, int64_t end) {
                  grad_rows(args, kernels, c, column_offset, begin, end);
                });
  return grad;
}

}  // namespace kdfused
