// The per-element math of the distillation loss (docs/design.md, "The loss") and the
// online-softmax merge, as inline host+device functions: the single definition
// that the CPU kernel and the CUDA kernel both include.
//
// Notation: s, t are one row's student and teacher logits, T the temperature.
// Maxima are kept in raw logit units (T > 0, so max(x / T) = max(x) / T); that
// lets x / T and x (the T = 1 softmax of the hard term) share one running max.
// Differences of logits are always formed before anything of a smaller scale
// is added ((x - m) / T - log z, not x / T - (m / T + log z)): with logits of
// magnitude 1e4 the other order loses ~1e-3 absolute to rounding.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kdfused {

// The per-element functions: always inlined, because a loop calling one out
// of line cannot be vectorised (GCC stopped inlining accumulate_terms once it
// grew, and the CPU kernel ran 5x slower).
#define KDFUSED_HOT C10_HOST_DEVICE C10_ALWAYS_INLINE

enum class Divergence : int32_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// The options, folded into the coefficients the inner loops use.
struct LossParams {
  float inv_t;       // 1 / T
  float alpha;       // weight of the hard term
  float soft_scale;  // T^2 if scale_by_t2 else 1: soft_i = soft_scale * D_i
  float soft_coef;   // (1 - alpha) * soft_scale: weight of D_i in loss_i
  float beta;        // JSD mixture weight of the teacher
  Divergence div;
  int64_t ignore_index;
  bool has_labels;
  bool t_is_2;  // T == 2 exactly (the common default): exp(x) = exp(x / T)^2
  bool t_is_1;  // T == 1 exactly: softmax(s / T) is softmax(s)
  // Label smoothing eps of the hard term (F.cross_entropy's): the target is
  // (1 - eps) onehot(y) + eps / V, so hard_i = (1 - eps) (-log q_y) +
  // (eps / V) sum_v (-log q_v). label_weight = 1 - eps, smooth_weight = eps / V.
  float label_weight;
  float smooth_weight;
  bool smoothing;  // eps > 0
};

// How pass 1 forms the T = 1 sum z1 of the hard term: not at all (no labels,
// or T = 1, where z1 is zs), with its own exp, or, for T = 2, as the square
// of the exp it already has.
enum class Z1 : int32_t { kNone = 0, kExp = 1, kSquare = 2 };

C10_HOST_DEVICE inline Z1 z1_mode(const LossParams& p) {
  if (!p.has_labels || p.t_is_1) return Z1::kNone;
  return p.t_is_2 ? Z1::kSquare : Z1::kExp;
}

C10_HOST_DEVICE inline float neg_inf() { return -INFINITY; }

#ifndef __CUDA_ARCH__
namespace host {

inline float from_bits(int32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

inline int32_t to_bits(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// exp(x) for x in [-104, 89] or NaN (the callers clamp): x = n ln2 + r with
// |r| <= ln2 / 2, exp(x) = 2^n exp(r).
C10_ALWAYS_INLINE float exp_core(float xc) {
  const float n = (xc * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest
  // ln2 in two parts: n * 0.693359375 is exact for |n| < 2^15.
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  // Taylor to r^7 (truncation < 0.05 ulp for |r| <= ln2 / 2), in Estrin's
  // order: 4 dependent steps instead of Horner's 7, so that the CPU overlaps
  // more of them.
  const float r2 = r * r;
  const float lo = (1.f + r) + r2 * (0.5f + r * (1.f / 6.f));
  const float hi = (1.f / 24.f + r * (1.f / 120.f)) + r2 * (1.f / 720.f + r * (1.f / 5040.f));
  const float e = lo + (r2 * r2) * hi;
  // 2^n as two normal powers of two, so that n down to -150 underflows gradually.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  return e * from_bits((half + 127) << 23) * from_bits((ni - half + 127) << 23);
}

}  // namespace host
#endif

// exp and log of the hot loops. On the GPU the hardware's (nvcc
// --use_fast_math). On the CPU branch-free polynomials, so that the compiler
// vectorises the loops that call them (calls into libm would keep them scalar):
// kd_exp within 2 ulp of exp (1.66 measured), keeping gradual underflow, +-inf
// and NaN; kd_log_prob within 1 ulp of log on its domain (below). Checked
// element by element in tests/test_math.py.
KDFUSED_HOT float kd_exp(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  // Outside [-104, 89] the result is 0 or inf anyway; NaN passes both tests.
  return host::exp_core(x < -104.f ? -104.f : (x > 89.f ? 89.f : x));
#endif
}

// kd_exp for x <= 0 (or NaN), as every exp of a shifted logit or of a
// log-probability is: on the CPU one clamp fewer.
KDFUSED_HOT float kd_exp_nonpos(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  return host::exp_core(x < -104.f ? -104.f : x);
#endif
}

// exp(d * scale - offset) where that exponent is <= 0 (or NaN). On the GPU it
// is 2^(d * (scale log2 e) - offset log2 e): one FFMA before the hardware's 2^x,
// as the two products by log2 e are loop-invariant and leave the loops, where
// expf of the exponent spends a multiply by log2 e per element (__expf rounds
// x log2 e too, so this is as accurate). On the CPU kd_exp_nonpos, unchanged.
KDFUSED_HOT float exp_affine(float d, float scale, float offset) {
#ifdef __CUDA_ARCH__
  constexpr float kLog2e = 1.44269504f;
  return ::exp2f(d * (scale * kLog2e) - offset * kLog2e);
#else
  return kd_exp_nonpos(d * scale - offset);
#endif
}

// log x for x in [0, 1] or NaN, with x below FLT_MIN taken as FLT_MIN (the
// GPU would flush it to 0 and make log x = -inf). Its caller, mix_gaps, takes
// it of a value in [min(beta, 1 - beta), 1]. NaN stays NaN.
KDFUSED_HOT float kd_log_prob(float x) {
  const float xn = x < FLT_MIN ? FLT_MIN : x;  // NaN fails the test and is kept
#ifdef __CUDA_ARCH__
  return ::logf(xn);
#else
  // xn = 2^k m with m in [sqrt(1/2), sqrt(2)): subtracting sqrt(1/2)'s bits
  // leaves k in the exponent field, so no compare is needed (musl's reduction);
  // with f = m - 1 (exact), log m = f - f^2 / 2 + f^3 q(f): q a degree-7
  // least-squares fit to (log1p(f) - f + f^2 / 2) / f^3 there (no division,
  // which the atanh form needed). Within 1 ulp of log on [FLT_MIN, 1].
  const int32_t ix = host::to_bits(xn) - 0x3f3504f3;
  const int32_t k = ix >> 23;  // arithmetic shift: negative below sqrt(1/2)
  const float m = host::from_bits((ix & 0x007fffff) + 0x3f3504f3);
  const float f = m - 1.f;
  const float f2 = f * f;
  const float q01 = 0.33333329f + f * -0.25000846f;
  const float q23 = 0.20001412f + f * -0.16622752f;
  const float q45 = 0.14197877f + f * -0.13161606f;
  const float q67 = 0.12786331f + f * -0.07660819f;
  const float q = (q01 + f2 * q23) + (f2 * f2) * (q45 + f2 * q67);  // Estrin order
  const float log_m = f + f2 * (-0.5f + f * q);
  const float kf = static_cast<float>(k);
  const float y = kf * 0.693359375f + (log_m - kf * 2.12194440e-4f);
  return xn == xn ? y : xn;
#endif
}

// exp((x - m) * inv_t), and exactly 0 for x == -inf even when m is -inf too
// (masked vocabulary entries must not produce NaN). NaN x propagates.
C10_HOST_DEVICE inline float shifted_exp(float x, float m, float inv_t) {
  return x == neg_inf() ? 0.f : kd_exp((x - m) * inv_t);
}

// weight * value with the convention 0 * log 0 = 0: a zero weight contributes
// 0 even when value is inf or NaN (e.g. -inf - -inf). A NaN weight propagates.
KDFUSED_HOT float weighted(float weight, float value) {
  return weight == 0.f ? 0.f : weight * value;
}

// The same for a probability weight, which counts as 0 below FLT_MIN (its term
// is below 1e-36; the GPU flushes such values to 0 anyway). Then log m, with m
// >= (1 - beta) p or beta p, is finite wherever the weight counts.
KDFUSED_HOT float prob_weighted(float prob, float value) {
  return prob < FLT_MIN ? 0.f : prob * value;
}

// NaN-propagating max: a NaN input never becomes the running max (x > m is
// false), so it reaches the sums through shifted_exp instead.
KDFUSED_HOT float max_keep(float m, float x) { return x > m ? x : m; }

// x - m, and -inf for x = -inf even when m is -inf too.
KDFUSED_HOT float below(float x, float m) { return x == neg_inf() ? neg_inf() : x - m; }

// Online softmax state of one row of both models (Milakov & Gimelshein 2018).
// The KL sums are kept as expectations of log-ratios measured from reference
// points chosen so that they are ~0 where the weights are large:
//   r_t = ((t - mt) - (s - ms)) / T   (0 at the teacher's peak if s peaks there too)
//   r_s = ((s - ms) - (t - ref)) / T  (exactly 0 at the student's peak)
// with ref the teacher's logit at the student's argmax. The sums ws, wt hold
// T r_s and T r_t (logit units: the division by T is done once per row, not
// once per element). Then (see row_consts)
//   KL(p_t || p_s) = wt / (T zt) + log zs - log zt
//   KL(p_s || p_t) = ws / (T zs) + (mt - ref) / T - (log zs - log zt)
// and the reverse-KL gradient needs r_s - ws / (T zs), which is small and exact
// where p_s is large, instead of the difference of two large log-ratios
// (a peaked student far from the teacher has log p_s - log p_t ~ 1e2 there).
struct RowStats {
  float ms, mt;  // running maxima of s and t
  float ref;     // finite teacher logit near the student's peak; -inf iff mt is -inf
  float zs, zt;  // sum exp((s - ms) / T), sum exp((t - mt) / T)
  float z1;      // sum exp(s - ms): the T = 1 softmax of the hard term
  float ws, wt;  // sum exp((s - ms) / T) * T r_s, sum exp((t - mt) / T) * T r_t
};

C10_HOST_DEVICE inline RowStats stats_empty() {
  return RowStats{neg_inf(), neg_inf(), neg_inf(), 0.f, 0.f, 0.f, 0.f, 0.f};
}

// A state with the given anchors and empty sums (for partial sums).
C10_HOST_DEVICE inline RowStats stats_anchored(const RowStats& st) {
  return RowStats{st.ms, st.mt, st.ref, 0.f, 0.f, 0.f, 0.f, 0.f};
}

// How far an old anchor lies below (or above, for ref) a new one: 0 when
// unchanged, even at -inf.
C10_HOST_DEVICE inline float anchor_shift(float old_a, float new_a) {
  return old_a == new_a ? 0.f : below(old_a, new_a);
}

// The ref to use once the student max becomes ms_new: the teacher logit at the
// new student argmax (t_at) if the max moved and that logit is finite, else the
// old ref, else any finite teacher logit (mt_new; -inf if there is none yet).
C10_HOST_DEVICE inline float next_ref(const RowStats& st, float ms_new, float t_at, float mt_new) {
  const bool usable = t_at != neg_inf() && t_at == t_at;  // finite-ish and not NaN
  if (ms_new > st.ms && usable) return t_at;
  return st.ref != neg_inf() ? st.ref : mt_new;
}

// Moves the state to new anchors (maxima kept if not larger).
C10_HOST_DEVICE inline void stats_rescale(RowStats& st, float ms_new, float mt_new, float ref_new,
                                          float inv_t) {
  ms_new = max_keep(st.ms, ms_new);
  mt_new = max_keep(st.mt, mt_new);
  if (ms_new == st.ms && mt_new == st.mt && ref_new == st.ref) return;
  // Every T r seen so far shifts by a constant; the weights scale by rs and rt.
  const float dms = anchor_shift(st.ms, ms_new);
  const float cs = dms - anchor_shift(st.ref, ref_new);
  const float ct = anchor_shift(st.mt, mt_new) - dms;
  const float rs = shifted_exp(st.ms, ms_new, inv_t);
  const float rt = shifted_exp(st.mt, mt_new, inv_t);
  st.ws = weighted(rs, st.ws + weighted(st.zs, cs));
  st.wt = weighted(rt, st.wt + weighted(st.zt, ct));
  st.zs *= rs;
  st.zt *= rt;
  st.z1 *= shifted_exp(st.ms, ms_new, 1.f);
  st.ms = ms_new;
  st.mt = mt_new;
  st.ref = ref_new;
}

// Raises the anchors to cover a chunk about to be added with accumulate_terms,
// given the chunk's maxima cms, cmt (NaN skipped) and t_at, the teacher logit
// at the chunk's first student argmax (read only when cms > st.ms): one
// rescale per chunk instead of one per new maximum.
C10_HOST_DEVICE inline void stats_raise(RowStats& st, float cms, float cmt, float t_at,
                                        float inv_t) {
  const float ms = max_keep(st.ms, cms);
  const float mt = max_keep(st.mt, cmt);
  stats_rescale(st, ms, mt, next_ref(st, ms, t_at, mt), inv_t);
}

// The same for n elements at hand (a GPU thread's pack). The maxima are plain
// fmaxf (NaN skipped, as by max_keep, since a running max is never NaN); the
// teacher logit at the pack's first student argmax is looked up only when the
// student max rises, and nothing more is done when no anchor moves: after a
// row's first packs, the common case.
C10_HOST_DEVICE inline void stats_raise(RowStats& st, const float* s, const float* t, int64_t n,
                                        float inv_t) {
  float cms = neg_inf();
  float cmt = neg_inf();
  for (int64_t k = 0; k < n; ++k) {
    cms = ::fmaxf(cms, s[k]);
    cmt = ::fmaxf(cmt, t[k]);
  }
  if (cms <= st.ms && cmt <= st.mt && st.ref != neg_inf()) return;  // next_ref keeps st.ref
  float t_at = neg_inf();
  if (cms > st.ms) {
    for (int64_t k = 0; k < n; ++k) {
      if (s[k] == cms) {
        t_at = t[k];
        break;
      }
    }
  }
  stats_raise(st, cms, cmt, t_at, inv_t);
}

// Which weighted sums of RowStats a divergence reads: reverse KL ws (its KL
// and mean_rs), forward KL wt, JSD neither.
struct WeightedSums {
  bool ws, wt;
};

constexpr WeightedSums sums_for(Divergence d) {
  return WeightedSums{d == Divergence::kReverseKL, d == Divergence::kForwardKL};
}

// What one element (s <= ms, t <= mt, or NaN) adds to the sums of a state with
// anchors ms, mt, ref (fields passed one by one, so that a CPU kernel can keep
// its partial sums in SIMD lanes). Returns exp((s - ms) / T), exp((t - mt) / T),
// which a kernel may keep: times a per-anchor factor they are p_s and p_t.
// kWs, kWt: whether to add to ws and wt. Only one divergence reads each
// (sums_for), and a kernel that knows its divergence saves the other's
// arithmetic; the skipped sum is then meaningless and must not be read.
struct ScaledExps {
  float es, et;
};

template <bool kWs = true, bool kWt = true>
KDFUSED_HOT ScaledExps accumulate_terms(float s, float t, float ms, float mt, float ref,
                                        float inv_t, Z1 z1_how, float& zs, float& zt, float& z1,
                                        float& ws, float& wt, bool finite_anchors = false) {
  // With finite anchors x - m is already below(x, m) (a kernel that knows it
  // saves the selects).
  const float ds = finite_anchors ? s - ms : below(s, ms);
  const float dt = finite_anchors ? t - mt : below(t, mt);
  const float es = exp_affine(ds, inv_t, 0.f);
  const float et = exp_affine(dt, inv_t, 0.f);
  zs += es;
  zt += et;
  if (kWs) ws += weighted(es, ds - (finite_anchors ? t - ref : below(t, ref)));
  if (kWt) wt += weighted(et, dt - ds);
  if (z1_how == Z1::kExp) z1 += kd_exp_nonpos(ds);
  if (z1_how == Z1::kSquare) z1 += es * es;
  return ScaledExps{es, et};
}

// Whether a state's anchors are all finite: then accumulate_terms may take
// finite_anchors (x - m needs no select for x = -inf: -inf - finite is -inf).
C10_HOST_DEVICE inline bool anchors_finite(const RowStats& st) {
  using std::isfinite;
  return isfinite(st.ms) && isfinite(st.mt) && isfinite(st.ref);
}

// Merges two partial states of the same row (order-independent up to rounding).
C10_HOST_DEVICE inline RowStats stats_merge(RowStats a, RowStats b, float inv_t) {
  const float ms = max_keep(a.ms, b.ms);
  const float mt = max_keep(a.mt, b.mt);
  // The ref of the part that holds the student's argmax, else the other's.
  // (Selected by value: references to a or b would keep both in GPU local memory.)
  const bool b_peak = b.ms > a.ms;
  const float peak_ref = b_peak ? b.ref : a.ref;
  const float ref = peak_ref != neg_inf() ? peak_ref : (b_peak ? a.ref : b.ref);
  stats_rescale(a, ms, mt, ref, inv_t);
  stats_rescale(b, ms, mt, ref, inv_t);
  return RowStats{ms, mt, ref, a.zs + b.zs, a.zt + b.zt, a.z1 + b.z1, a.ws + b.ws, a.wt + b.wt};
}

// The student's entropy H(p_s) = -sum p_s log p_s of a row (p_s = softmax(s / T)),
// from one more sum that pass 1 keeps beside RowStats when it is asked for:
//   hs = sum exp((s - ms) / T) (s - ms)        (logit units, anchored at ms)
// Then H = log zs - hs / (T zs): both terms are >= 0 (hs <= 0), so nothing
// cancels, and a masked logit (exp 0) adds nothing (0 log 0 = 0). It is kept
// out of RowStats so that the statistics the vocab-parallel phases exchange
// (ShardStats) and the kernels that do not ask keep their size and work.

// What one element adds to hs, given its es = exp((s - ms) / T) (as
// accumulate_terms returns it) and the anchor's finiteness as there.
KDFUSED_HOT float entropy_term(float s, float ms, float es, bool finite_anchors = false) {
  return weighted(es, finite_anchors ? s - ms : below(s, ms));
}

// hs, accumulated with the anchor ms_old and the sum zs_old = sum exp((s -
// ms_old) / T), moved to the anchor ms_new >= ms_old: every s - ms shifts by
// ms_old - ms_new and every weight scales by exp((ms_old - ms_new) / T), as
// stats_rescale moves ws. Unchanged when the anchor is (the common case).
C10_HOST_DEVICE inline float entropy_moved(float hs, float zs_old, float ms_old, float ms_new,
                                           float inv_t) {
  if (ms_old == ms_new) return hs;
  const float r = shifted_exp(ms_old, ms_new, inv_t);
  return weighted(r, hs + weighted(zs_old, anchor_shift(ms_old, ms_new)));
}

// H(p_s) of a row from its complete zs and hs (both at the anchor ms).
C10_HOST_DEVICE inline float row_entropy(float hs, float zs, float inv_t) {
  return ::logf(zs) - hs / zs * inv_t;
}

// What the later passes need of a row once its statistics are complete.
struct RowConsts {
  float ms, mt, ref;     // the anchors
  float log_zs, log_zt;  // log-normalisers of s / T and t / T (relative to the maxima)
  float log_z1;          // log-normaliser of s (T = 1)
  float mean_rs;         // E_ps[r_s] = ws / (T zs) (reverse-KL gradient)
  float div;             // D_i: known after pass 1 for the KLs, after jsd_finish for JSD
  float kl_sm;           // JSD only: KL(p_s || m)
  float q_per_ps2;       // T = 2: softmax(s) = p_s^2 zs^2 / z1
  float sum_below;       // label smoothing only: sum_v (s_v - ms) (smooth_sum)
};

C10_HOST_DEVICE inline RowConsts row_consts(const RowStats& st, const LossParams& p) {
  RowConsts c;
  c.ms = st.ms;
  c.mt = st.mt;
  c.ref = st.ref;
  c.log_zs = ::logf(st.zs);
  c.log_zt = ::logf(st.zt);
  c.log_z1 = p.t_is_1 ? c.log_zs : ::logf(st.z1);  // T = 1: z1 is zs (z1_mode)
  c.mean_rs = st.ws / st.zs * p.inv_t;
  c.kl_sm = 0.f;
  c.q_per_ps2 = (st.zs / st.z1) * st.zs;
  c.sum_below = 0.f;
  const float lz = c.log_zs - c.log_zt;
  if (p.div == Divergence::kForwardKL) {
    c.div = st.wt / st.zt * p.inv_t + lz;
  } else if (p.div == Divergence::kReverseKL) {
    // ref = -inf: no finite teacher logit, any student mass makes ws = inf.
    const float ref_term = st.ref == neg_inf() ? 0.f : (st.mt - st.ref) * p.inv_t;
    c.div = c.mean_rs + ref_term - lz;
  } else {
    c.div = 0.f;  // JSD needs a second pass: jsd_accumulate, jsd_finish
  }
  return c;
}

KDFUSED_HOT float log_ps(float s, const RowConsts& c, const LossParams& p) {
  return (s - c.ms) * p.inv_t - c.log_zs;
}

KDFUSED_HOT float log_pt(float t, const RowConsts& c, const LossParams& p) {
  return (t - c.mt) * p.inv_t - c.log_zt;
}

// p_s = exp(log_ps) and p_t = exp(log_pt), the exponents formed as there.
KDFUSED_HOT float prob_s(float s, const RowConsts& c, const LossParams& p) {
  return exp_affine(s - c.ms, p.inv_t, c.log_zs);
}

KDFUSED_HOT float prob_t(float t, const RowConsts& c, const LossParams& p) {
  return exp_affine(t - c.mt, p.inv_t, c.log_zt);
}

// log p_t - log p_s of one element, from the logits: the shifted logits'
// difference first, then the row's constant (exact where both are finite;
// -inf - -inf, both masked, is NaN and weighted by 0 wherever it is read).
KDFUSED_HOT float log_ratio_ts(float s, float t, const RowConsts& c, const LossParams& p) {
  return (below(t, c.mt) - below(s, c.ms)) * p.inv_t + (c.log_zs - c.log_zt);
}

// JSD's log-ratios to the mixture m = beta p_t + (1 - beta) p_s of one
// element: ds = log p_s - log m and dt = log p_t - log m, given the two
// probabilities and d = log p_t - log p_s. m is taken relative to the larger
// probability, log m - log p_big = log(w_big + w_small (p_small / p_big)), whose
// argument lies in [min(beta, 1 - beta), 1]: at a large temperature, where
// p_s ~ p_t and ds, dt are small, forming log m first and subtracting would
// lose them to the rounding of two log-probabilities (as PyTorch's logaddexp
// does not). Both 0 (a masked element): NaN, weighted by 0 where it is read.
struct MixGaps {
  float ds, dt;
};

KDFUSED_HOT MixGaps mix_gaps(float ps, float pt, float d, const LossParams& p) {
  const bool t_big = pt > ps;
  const float ratio = t_big ? ps / pt : pt / ps;
  const float w_big = t_big ? p.beta : 1.f - p.beta;
  const float w_small = t_big ? 1.f - p.beta : p.beta;
  const float up = kd_log_prob(w_big + w_small * ratio);  // log m - log p_big
  return t_big ? MixGaps{-d - up, -up} : MixGaps{-up, d - up};
}

// JSD pass 2: the two row sums KL(p_t || m) and KL(p_s || m).
struct JsdSums {
  float kl_tm;
  float kl_sm;
};

// What one element contributes to JSD: both probabilities and their
// log-ratios to the mixture.
struct JsdElement {
  float ps, pt;
  MixGaps gap;
};

KDFUSED_HOT JsdElement jsd_element(float s, float t, float ps, float pt, const RowConsts& c,
                                   const LossParams& p) {
  return JsdElement{ps, pt, mix_gaps(ps, pt, log_ratio_ts(s, t, c, p), p)};
}

KDFUSED_HOT JsdElement jsd_element(float s, float t, const RowConsts& c, const LossParams& p) {
  return jsd_element(s, t, prob_s(s, c, p), prob_t(t, c, p), c, p);
}

KDFUSED_HOT void jsd_accumulate(JsdSums& acc, const JsdElement& e) {
  acc.kl_tm += prob_weighted(e.pt, e.gap.dt);
  acc.kl_sm += prob_weighted(e.ps, e.gap.ds);
}

KDFUSED_HOT void jsd_accumulate(JsdSums& acc, float s, float t, const RowConsts& c,
                                const LossParams& p) {
  jsd_accumulate(acc, jsd_element(s, t, c, p));
}

// dJSD/ds * T for one element, from p_s and log p_s - log m (JSD pass done).
KDFUSED_HOT float jsd_grad(float ps, float lps_minus_lm, const RowConsts& c, const LossParams& p) {
  return (1.f - p.beta) * prob_weighted(ps, lps_minus_lm - c.kl_sm);
}

C10_HOST_DEVICE inline JsdSums jsd_merge(JsdSums a, JsdSums b) {
  return JsdSums{a.kl_tm + b.kl_tm, a.kl_sm + b.kl_sm};
}

C10_HOST_DEVICE inline void jsd_finish(RowConsts& c, const JsdSums& acc, const LossParams& p) {
  c.kl_sm = acc.kl_sm;
  c.div = p.beta * acc.kl_tm + (1.f - p.beta) * acc.kl_sm;
}

// hard_i = -log softmax(s)[y] = (ms - s[y]) + log z1: the difference first, so
// that logits of magnitude 1e4 lose nothing to the rounding of ms + log z1.
// With label smoothing, (1 - eps) of that and eps of the mean of -log q_v,
// (eps / V) sum_v (ms - s_v) + eps log z1: (1 - eps) (ms - s[y]) - (eps / V)
// sum_below + log z1 (without smoothing exactly the first form: 1 x - 0).
C10_HOST_DEVICE inline float hard_loss(float s_label, const RowConsts& c, const LossParams& p) {
  return (p.label_weight * (c.ms - s_label) - weighted(p.smooth_weight, c.sum_below)) + c.log_z1;
}

// What one logit adds to sum_below (smoothing's row sum): s - ms, -inf for a
// masked one (the smoothed loss is then inf, as F.cross_entropy's).
KDFUSED_HOT float smooth_term(float s, float ms) { return below(s, ms); }

// T = 2: softmax(s) = p_s^2 zs^2 / z1 (one exp fewer), as p_s * (p_s * zs^2 / z1)
// so that it underflows no sooner than exp would.
KDFUSED_HOT float softmax_from_ps(float ps, const RowConsts& c) { return ps * (ps * c.q_per_ps2); }

// The gradient's two coefficients with the reduction's row weight grad_scale
// (1 / counted rows for batchmean) folded in, so that it costs an element no
// multiply: g_i = hard * (q - onehot(y)) + soft * T dD/ds.
struct GradCoefs {
  float hard;    // grad_scale * alpha
  float soft;    // grad_scale * (1 - alpha) * soft_scale / T
  float smooth;  // hard * eps / V: label smoothing's share of every element
  float label;   // 1 - eps: the label's own share of its onehot
};

C10_HOST_DEVICE inline GradCoefs grad_coefs(const LossParams& p, float grad_scale) {
  const float hard = grad_scale * p.alpha;
  return GradCoefs{hard, grad_scale * (p.soft_coef * p.inv_t), hard * p.smooth_weight,
                   p.label_weight};
}

// Where the gradient's hard term takes q = softmax(s) from, when the soft
// term has p_s = softmax(s / T) at hand: its own exp of the logit, or p_s
// itself for T = 1 and p_s^2 zs^2 / z1 for T = 2 (no exp, no logit read).
enum class HardQ : int32_t { kExp, kPs, kPsSquared };

// The gradient of one element, grad_scale * d loss_i / d s_iv, from its p_s and
// dd = T dD/ds: k.hard * (q - onehot(y)) + k.soft * dd with q = softmax(s),
// taken as kQ says (from p_s only with a soft term). kHard / kSoft: the hard /
// soft term has a weight; a term whose weight is 0 is skipped, so it cannot
// turn a finite gradient NaN. kSmooth: label smoothing, whose target is
// (1 - eps) onehot(y) + eps / V: k.hard (q - k.label onehot(y)) - k.smooth.
template <bool kHard, bool kSoft, HardQ kQ, bool kSmooth = false>
KDFUSED_HOT float combine_grad(float s, float ps, float dd, bool is_label, const RowConsts& c,
                               const GradCoefs& k) {
  constexpr bool kFromPs = kHard && kSoft && kQ != HardQ::kExp;
  float g = 0.f;
  if (kFromPs && kQ == HardQ::kPsSquared && !is_label) {
    // k.hard * softmax_from_ps(ps, c) with the two constants multiplied once
    // per row (the inner product stays >= the result: no earlier underflow).
    g = ps * (ps * (c.q_per_ps2 * k.hard));
  } else if (kFromPs && kQ == HardQ::kPs && !is_label) {
    g = k.hard * ps;
  } else if (kHard) {
    const float q = !kFromPs                  ? exp_affine(s - c.ms, 1.f, c.log_z1)
                    : kQ == HardQ::kPsSquared ? softmax_from_ps(ps, c)
                                              : ps;
    g = k.hard * (q - (is_label ? (kSmooth ? k.label : 1.f) : 0.f));
  }
  if (kHard && kSmooth) g -= k.smooth;
  if (kSoft) g += k.soft * dd;
  return g;
}

// grad_scale * d loss_i / d s_iv for one element, for a divergence D known at
// compile time, given p_s and p_t (p_t unused by reverse KL).
template <Divergence D, bool kHard, bool kSoft, HardQ kQ = HardQ::kExp, bool kSmooth = false>
KDFUSED_HOT float grad_from_probs(float s, float t, float ps, float pt, bool is_label,
                                  const RowConsts& c, const LossParams& p, const GradCoefs& k) {
  float dd = 0.f;
  if (kSoft) {
    if (D == Divergence::kForwardKL) {
      dd = ps - pt;
    } else if (D == Divergence::kReverseKL) {
      // log p_s - log p_t - KL(p_s || p_t) = r_s - E_ps[r_s]
      dd = weighted(ps, (below(s, c.ms) - below(t, c.ref)) * p.inv_t - c.mean_rs);
    } else {
      dd = jsd_grad(ps, mix_gaps(ps, pt, log_ratio_ts(s, t, c, p), p).ds, c, p);
    }
  }
  return combine_grad<kHard, kSoft, kQ, kSmooth>(s, ps, dd, is_label, c, k);
}

// The same, computing p_s and p_t (what the soft term needs of them) itself.
template <Divergence D, bool kHard, bool kSoft, HardQ kQ = HardQ::kExp, bool kSmooth = false>
KDFUSED_HOT float grad_element_as(float s, float t, bool is_label, const RowConsts& c,
                                  const LossParams& p, const GradCoefs& k) {
  const float ps = kSoft ? prob_s(s, c, p) : 0.f;
  const float pt = kSoft && D != Divergence::kReverseKL ? prob_t(t, c, p) : 0.f;
  return grad_from_probs<D, kHard, kSoft, kQ, kSmooth>(s, t, ps, pt, is_label, c, p, k);
}

// Calls f(std::integral_constant<Divergence, D>) for the run-time divergence.
template <typename F>
C10_HOST_DEVICE inline decltype(auto) with_divergence(Divergence d, F&& f) {
  if (d == Divergence::kForwardKL)
    return f(std::integral_constant<Divergence, Divergence::kForwardKL>{});
  if (d == Divergence::kReverseKL)
    return f(std::integral_constant<Divergence, Divergence::kReverseKL>{});
  return f(std::integral_constant<Divergence, Divergence::kJSD>{});
}

// One of grad_element_as's instantiations, as a type a kernel can carry into
// its loops (so that they test the divergence and the term weights once per row).
template <Divergence D, bool kHard, bool kSoft, HardQ kQ, bool kSmooth = false>
struct GradVariant {
  static constexpr Divergence kDivergence = D;
  static constexpr bool kHasHard = kHard, kHasSoft = kSoft, kSmoothed = kSmooth;
  static constexpr HardQ kHardQ = kQ;
  KDFUSED_HOT static float element(float s, float t, bool is_label, const RowConsts& c,
                                   const LossParams& p, const GradCoefs& k) {
    return grad_element_as<D, kHard, kSoft, kQ, kSmooth>(s, t, is_label, c, p, k);
  }
};

// Calls f(GradVariant<...>{}) for the run-time divergence and term weights
// (and label smoothing, which matters only with a hard term).
template <typename F>
C10_HOST_DEVICE inline decltype(auto) with_grad_variant(const LossParams& p, F&& f) {
  const bool hard = p.has_labels && p.alpha != 0.f;
  const bool soft = p.soft_coef != 0.f;
  return with_divergence(p.div, [&](auto d) {
    constexpr Divergence D = decltype(d)::value;
    const auto hard_variant = [&](auto smooth) {
      constexpr bool S = decltype(smooth)::value;
      if (soft && p.t_is_2) return f(GradVariant<D, true, true, HardQ::kPsSquared, S>{});
      if (soft && p.t_is_1) return f(GradVariant<D, true, true, HardQ::kPs, S>{});
      if (soft) return f(GradVariant<D, true, true, HardQ::kExp, S>{});
      return f(GradVariant<D, true, false, HardQ::kExp, S>{});
    };
    if (hard && p.smoothing) return hard_variant(std::true_type{});
    if (hard) return hard_variant(std::false_type{});
    if (soft) return f(GradVariant<D, false, true, HardQ::kExp>{});
    return f(GradVariant<D, false, false, HardQ::kExp>{});  // neither term: 0
  });
}

// grad_element_as with the divergence and the term weights known at run time.
C10_HOST_DEVICE inline float grad_element(float s, float t, bool is_label, const RowConsts& c,
                                          const LossParams& p, const GradCoefs& k) {
  return with_grad_variant(
      p, [&](auto variant) { return decltype(variant)::element(s, t, is_label, c, p, k); });
}

// ---------------------------------------------------------------------------
// The sparse teacher (docs/design.md, "The sparse teacher"): the teacher is k stored
// log-probabilities lp_i (at store temperature Ts) of kept ids idx_i, and the
// divergence is taken over k + 1 buckets: the kept ids and the tail (all other
// ids). The student's buckets are p_s[idx_i] and its mass outside the kept ids,
// from one online softmax over its row; the teacher's are softmax([a_1 .. a_k,
// a_g]) with a_i = lp_i Ts / T and a_g = log(1 - sum exp(lp_i)) Ts / T ("ghost"
// tail) or a_g = -inf ("renormalize": the kept weights alone).
//
// For any divergence D of bucket probabilities b_j, an element v in bucket j
// has T dD/ds_v = p_s[v] (c_j - sum_l b_l c_l) with c_j = dD/db_j: per kept id
// one value, and for the whole tail one factor h_g times p_s[v]. So the
// gradient pass writes p_s[v] h_g everywhere and then the k kept elements.

enum class Tail : int32_t { kGhost = 0, kRenormalize = 1 };

// Online softmax of one student row, with the sum over its tail (the ids
// outside the kept set) kept apart, as the same running sum masked: it is
// exact however small the tail is, where 1 - sum p_s[kept] would cancel to 0.
struct SparseStats {
  float ms;     // running max of s
  float zs;     // sum exp((s - ms) / T)
  float ztail;  // the same over the tail
  float z1;     // sum exp(s - ms) (the hard term, T != 1)
};

C10_HOST_DEVICE inline SparseStats sparse_empty() { return SparseStats{neg_inf(), 0.f, 0.f, 0.f}; }

// Moves a state to the max ms_new (kept if not larger).
C10_HOST_DEVICE inline void sparse_rescale(SparseStats& st, float ms_new, float inv_t) {
  ms_new = max_keep(st.ms, ms_new);
  if (ms_new == st.ms) return;
  const float r = shifted_exp(st.ms, ms_new, inv_t);
  st.zs *= r;
  st.ztail *= r;
  st.z1 *= shifted_exp(st.ms, ms_new, 1.f);
  st.ms = ms_new;
}

C10_HOST_DEVICE inline SparseStats sparse_merge(SparseStats a, SparseStats b, float inv_t) {
  const float ms = max_keep(a.ms, b.ms);
  sparse_rescale(a, ms, inv_t);
  sparse_rescale(b, ms, inv_t);
  return SparseStats{ms, a.zs + b.zs, a.ztail + b.ztail, a.z1 + b.z1};
}

// What one logit s <= ms (or NaN) adds; tail is 1 for an id outside the kept
// set, 0 for a kept one. Returns exp((s - ms) / T).
KDFUSED_HOT float sparse_accumulate(float s, float tail, float ms, float inv_t, Z1 z1_how,
                                    float& zs, float& ztail, float& z1, bool finite_anchor) {
  const float ds = finite_anchor ? s - ms : below(s, ms);
  const float es = exp_affine(ds, inv_t, 0.f);
  zs += es;
  ztail += es * tail;
  if (z1_how == Z1::kExp) z1 += kd_exp_nonpos(ds);
  if (z1_how == Z1::kSquare) z1 += es * es;
  return es;
}

// The teacher's entries as the kernels read them, in the dtypes they came in
// (converted one element at a time, never as a copy of the batch). Padded
// layout (offsets null): row i is entries [i k, (i + 1) k), -1 pads. Ragged:
// row i is entries [offsets[i], offsets[i + 1]) and k is the longest row.
enum class IdType : int32_t { kInt64 = 0, kInt32 = 1, kUInt16 = 2 };
enum class LogprobType : int32_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct TeacherEntries {
  const void* ids;
  const void* logprobs;
  const int64_t* offsets;  // [N + 1], or null: padded
  int64_t k;
  IdType id_type;
  LogprobType lp_type;

  C10_HOST_DEVICE int64_t row_begin(int64_t i) const { return offsets ? offsets[i] : i * k; }
  C10_HOST_DEVICE int64_t row_end(int64_t i) const { return offsets ? offsets[i + 1] : i * k + k; }
  C10_HOST_DEVICE int64_t id(int64_t e) const {
    if (id_type == IdType::kInt64) return static_cast<const int64_t*>(ids)[e];
    if (id_type == IdType::kInt32) return static_cast<const int32_t*>(ids)[e];
    return static_cast<const uint16_t*>(ids)[e];
  }
  C10_HOST_DEVICE float logprob(int64_t e) const {
    if (lp_type == LogprobType::kFloat) return static_cast<const float*>(logprobs)[e];
    if (lp_type == LogprobType::kHalf) {
      return static_cast<float>(static_cast<const c10::Half*>(logprobs)[e]);
    }
    return static_cast<float>(static_cast<const c10::BFloat16*>(logprobs)[e]);
  }
};

// A kept id's p_s as the ratio exp((s - ms) / T) / zs (inv_zs = 1 / zs), as
// the gradient pass forms the other ids': exp(log p_s) would carry log zs's
// rounding (|log zs| ~ 10 for V ~ 32k) into every kept id.
KDFUSED_HOT float prob_s_ratio(float s, float ms, float inv_t, float inv_zs) {
  return exp_affine(below(s, ms), inv_t, 0.f) * inv_zs;
}

// The student row's constants (the RowConsts fields the hard term and
// combine_grad read) and log b_g, the log of its tail bucket (-inf when the
// kept ids hold all its mass).
struct SparseConsts {
  RowConsts c;
  float log_tail;
};

C10_HOST_DEVICE inline SparseConsts sparse_consts(const SparseStats& st, const LossParams& p) {
  SparseConsts out;
  RowConsts& c = out.c;
  c.ms = st.ms;
  c.mt = c.ref = 0.f;
  c.log_zs = ::logf(st.zs);
  c.log_zt = 0.f;
  c.log_z1 = p.t_is_1 ? c.log_zs : ::logf(st.z1);
  c.mean_rs = c.div = c.kl_sm = 0.f;
  c.q_per_ps2 = (st.zs / st.z1) * st.zs;
  c.sum_below = 0.f;
  out.log_tail = st.ztail > 0.f ? ::logf(st.ztail) - c.log_zs : neg_inf();
  return out;
}

// What sparse_buckets leaves for the gradient pass: D over the buckets, and
// h_g, with T dD/ds_v = p_s[v] h_g for every tail element v.
struct SparseRow {
  float div;
  float tail_coef;
};

// The teacher's tail mass at store temperature: 1 - sum exp(lp_i), clamped to
// [0, 1], and exactly 0 when the row keeps all V ids. Where the kept ids hold
// nearly all the mass the tail is a small difference of numbers near 1, and
// the divergence reads its log: in float32 either form, 1 - sum exp(lp_i) or
// -expm1(log sum exp(lp_i)), leaves it only to about 1e-7 absolute (20%
// relative at a tail of 6e-7, a wrong sign below 1e-7). So it is formed in
// double, as -expm1(m + log1p(sum over the other ids of exp(lp_i - m))) with
// m the largest lp_i: exact to double rounding however close to 1 the kept
// mass is (one kept log-prob of -1e-20 leaves a tail of 1e-20, not 0), from
// the float32 log-probs as they are. It costs k double exps per row.
C10_HOST_DEVICE inline float sparse_teacher_tail(const float* lp, int64_t n, bool all_kept) {
  if (all_kept) return 0.f;
  float m = neg_inf();
  for (int64_t i = 0; i < n; ++i) m = max_keep(m, lp[i]);
  if (m == neg_inf()) return 1.f;  // nothing kept
  double rest = 0.0;
  bool top_seen = false;  // the largest is the 1 of log1p, counted once
  for (int64_t i = 0; i < n; ++i) {
    if (!top_seen && lp[i] == m) {
      top_seen = true;
      continue;
    }
    rest += ::exp(static_cast<double>(lp[i]) - static_cast<double>(m));
  }
  const double g = -::expm1(static_cast<double>(m) + ::log1p(rest));
  return g < 0.0 ? 0.f : (g > 1.0 ? 1.f : static_cast<float>(g));
}

// The divergence over the k + 1 buckets of one row. n: the kept (not padded)
// entries; lb[i]: the student's log p_s[idx_i]; x[i]: in, the stored log-prob
// lp_i; out, T dD/ds at idx_i. log_tail: the student's log b_g; all_kept: n is
// the whole vocabulary. st_over_t = Ts / T. ps[i]: p_s[idx_i] itself (the
// ratio form, prob_s_ratio), or null: exp(lb[i]). A renormalized row with no
// kept entry has no teacher: D = 0 and no gradient.
C10_HOST_DEVICE inline SparseRow sparse_buckets(const float* lb, float* x, int64_t n,
                                                float log_tail, bool all_kept, Tail tail,
                                                float st_over_t, const LossParams& p,
                                                const float* ps = nullptr) {
  if (tail == Tail::kRenormalize && n == 0) {
    return SparseRow{0.f, 0.f};
  }
  // The teacher's log-weights a_i = lp_i Ts / T and its tail's a_g, and their
  // log-normaliser M + log z.
  const float a_tail =
      tail == Tail::kGhost ? ::logf(sparse_teacher_tail(x, n, all_kept)) * st_over_t : neg_inf();
  float m = a_tail;
  for (int64_t i = 0; i < n; ++i) m = max_keep(m, x[i] * st_over_t);
  float z = shifted_exp(a_tail, m, 1.f);
  for (int64_t i = 0; i < n; ++i) z += shifted_exp(x[i] * st_over_t, m, 1.f);
  const float log_z = ::logf(z);
  const auto log_pt = [&](float a) { return below(a, m) - log_z; };
  const float lpt_g = log_pt(a_tail);
  const float pt_g = ::expf(lpt_g);
  const float ps_g = ::expf(log_tail);
  const bool tail_live = ps_g > 0.f;  // else no tail element carries mass
  const auto ps_of = [&](int64_t i) { return ps ? ps[i] : ::expf(lb[i]); };
  const float q = p.beta, q1 = 1.f - p.beta;
  if (p.div == Divergence::kForwardKL) {
    float d = weighted(pt_g, lpt_g - log_tail);
    for (int64_t i = 0; i < n; ++i) {
      const float lpt = log_pt(x[i] * st_over_t);
      d += weighted(::expf(lpt), lpt - lb[i]);
      x[i] = ps_of(i) - ::expf(lpt);  // p_s - p_t
    }
    return SparseRow{d, tail_live ? 1.f - pt_g / ps_g : 0.f};
  }
  if (p.div == Divergence::kReverseKL) {
    float d = weighted(ps_g, log_tail - lpt_g);
    for (int64_t i = 0; i < n; ++i) d += weighted(ps_of(i), lb[i] - log_pt(x[i] * st_over_t));
    for (int64_t i = 0; i < n; ++i) {
      x[i] = weighted(ps_of(i), (lb[i] - log_pt(x[i] * st_over_t)) - d);
    }
    return SparseRow{d, tail_live ? (log_tail - lpt_g) - d : 0.f};
  }
  // JSD: m_j = beta P_j + (1 - beta) b_j per bucket.
  const auto gaps = [&](float lpt, float lps) {
    return mix_gaps(::expf(lps), ::expf(lpt), lpt - lps, p);
  };
  const MixGaps gap_g = gaps(lpt_g, log_tail);
  float kl_tm = prob_weighted(pt_g, gap_g.dt);
  float kl_sm = prob_weighted(ps_g, gap_g.ds);
  for (int64_t i = 0; i < n; ++i) {
    const float lpt = log_pt(x[i] * st_over_t);
    const MixGaps gap = gaps(lpt, lb[i]);
    kl_tm += prob_weighted(::expf(lpt), gap.dt);
    kl_sm += prob_weighted(ps_of(i), gap.ds);
  }
  for (int64_t i = 0; i < n; ++i) {
    const MixGaps gap = gaps(log_pt(x[i] * st_over_t), lb[i]);
    x[i] = q1 * prob_weighted(ps_of(i), gap.ds - kl_sm);
  }
  const float tail_coef = ps_g >= FLT_MIN ? q1 * (gap_g.ds - kl_sm) : 0.f;
  return SparseRow{q * kl_tm + q1 * kl_sm, tail_coef};
}

// ---------------------------------------------------------------------------
// Vocab-parallel rows (docs/design.md, "Vocab-parallel"): each of W ranks holds a contiguous
// shard of every row. A rank's statistics phase reduces its shard to a
// ShardStats; the ranks exchange those (the only data that crosses), and each
// merges all W in rank order (the same bits everywhere), finishes the row's
// constants with row_consts, and writes its shard's gradient from them.

// One shard's part of a row, as plain floats (exchanged as a [W, N, 12] tensor).
struct ShardStats {
  RowStats st;
  float sum_below;  // label smoothing: sum over the shard of s - st.ms (0 otherwise)
  float s_label;    // the label's logit if the label lies in this shard
  float has_label;  // 1 if it does, else 0
  float columns;    // the shard's width V_r
};
static_assert(sizeof(ShardStats) == 12 * sizeof(float), "ShardStats is 12 floats");
static_assert(sizeof(RowConsts) == 11 * sizeof(float), "RowConsts is 11 floats");

// The whole row's statistics from W shards' (shard r at shards[r * stride]),
// merged in rank order: RowStats, label smoothing's sum relative to the merged
// max (sum_r [sum_below_r + V_r (ms_r - ms)]), and the label's logit.
C10_HOST_DEVICE inline ShardStats merge_shards(const ShardStats* shards, int64_t w, int64_t stride,
                                               float inv_t) {
  ShardStats out = shards[0];
  for (int64_t r = 1; r < w; ++r) out.st = stats_merge(out.st, shards[r * stride].st, inv_t);
  out.sum_below = 0.f;
  out.has_label = 0.f;
  out.s_label = 0.f;
  out.columns = 0.f;
  for (int64_t r = 0; r < w; ++r) {
    const ShardStats& x = shards[r * stride];
    // A shard whose max is -inf sums to -inf already (every logit masked).
    const float shift = x.st.ms == out.st.ms ? 0.f : weighted(x.columns, below(x.st.ms, out.st.ms));
    out.sum_below += x.sum_below + shift;
    if (x.has_label != 0.f) {
      out.s_label = x.s_label;
      out.has_label = 1.f;
    }
    out.columns += x.columns;
  }
  return out;
}

}  // namespace kdfused
