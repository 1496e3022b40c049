// The per-element math of the distillation loss (DESIGN.md section 1) and the
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

#include <cmath>
#include <cstdint>

namespace kdfused {

enum class Divergence : int32_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// The options, folded into the coefficients the inner loops use.
struct LossParams {
  float inv_t;        // 1 / T
  float alpha;        // weight of the hard term
  float soft_scale;   // T^2 if scale_by_t2 else 1: soft_i = soft_scale * D_i
  float soft_coef;    // (1 - alpha) * soft_scale: weight of D_i in loss_i
  float beta;         // JSD mixture weight of the teacher
  float log_beta;     // log(beta)
  float log_1m_beta;  // log(1 - beta)
  Divergence div;
  int64_t ignore_index;
  bool has_labels;
};

C10_HOST_DEVICE inline float neg_inf() { return -INFINITY; }

// exp((x - m) * inv_t), and exactly 0 for x == -inf even when m is -inf too
// (masked vocabulary entries must not produce NaN). NaN x propagates.
C10_HOST_DEVICE inline float shifted_exp(float x, float m, float inv_t) {
  return x == neg_inf() ? 0.f : ::expf((x - m) * inv_t);
}

// weight * value with the convention 0 * log 0 = 0: a zero weight contributes
// 0 even when value is inf or NaN (e.g. -inf - -inf). A NaN weight propagates.
C10_HOST_DEVICE inline float weighted(float weight, float value) {
  return weight == 0.f ? 0.f : weight * value;
}

// NaN-propagating max: a NaN input never becomes the running max (x > m is
// false), so it reaches the sums through shifted_exp instead.
C10_HOST_DEVICE inline float max_keep(float m, float x) { return x > m ? x : m; }

// Online softmax state of one row of one model (Milakov & Gimelshein 2018).
struct RowStats {
  float m;   // running max of x
  float z;   // sum exp((x - m) / T)
  float z1;  // sum exp(x - m), the T = 1 softmax (student only, hard term)
  float w;   // sum exp((x - m) / T) * (x - o) / T, o the other model's logit
};

C10_HOST_DEVICE inline RowStats stats_empty() { return RowStats{neg_inf(), 0.f, 0.f, 0.f}; }

// Moves the state to a new max m_new (no-op unless m_new > st.m).
C10_HOST_DEVICE inline void stats_rescale(RowStats& st, float m_new, float inv_t) {
  if (m_new > st.m) {
    const float r = shifted_exp(st.m, m_new, inv_t);
    st.z *= r;
    st.z1 *= shifted_exp(st.m, m_new, 1.f);
    st.w = weighted(r, st.w);
    st.m = m_new;
  }
}

// Adds one element whose logit is x (x <= st.m, or NaN) and whose log-ratio
// to the other model is d = (x - o) / T.
C10_HOST_DEVICE inline void stats_accumulate(RowStats& st, float x, float d, float inv_t,
                                             bool with_z1) {
  const float e = shifted_exp(x, st.m, inv_t);
  st.z += e;
  st.w += weighted(e, d);
  if (with_z1) st.z1 += shifted_exp(x, st.m, 1.f);
}

// One step of the online softmax: rescale to the new max, then add.
C10_HOST_DEVICE inline void stats_push(RowStats& st, float x, float d, float inv_t, bool with_z1) {
  stats_rescale(st, max_keep(st.m, x), inv_t);
  stats_accumulate(st, x, d, inv_t, with_z1);
}

// Merges two partial states of the same row (order-independent up to rounding).
C10_HOST_DEVICE inline RowStats stats_merge(RowStats a, RowStats b, float inv_t) {
  const float m = max_keep(a.m, b.m);
  stats_rescale(a, m, inv_t);
  stats_rescale(b, m, inv_t);
  return RowStats{m, a.z + b.z, a.z1 + b.z1, a.w + b.w};
}

// What the gradient pass needs of a row once its statistics are complete.
struct RowConsts {
  float ms, mt;          // row maxima of s and t
  float log_zs, log_zt;  // log-normalisers of s / T and t / T (relative to the maxima)
  float log_z1;          // log-normaliser of s (T = 1)
  float k;               // log p_t - log p_s = (t - s) / T + k
  float div;             // D_i: known after pass 1 for the KLs, after jsd_finish for JSD
  float kl_sm;           // JSD only: KL(p_s || m)
};

C10_HOST_DEVICE inline RowConsts row_consts(const RowStats& s, const RowStats& t,
                                            const LossParams& p) {
  RowConsts c;
  c.ms = s.m;
  c.mt = t.m;
  c.log_zs = ::logf(s.z);
  c.log_zt = ::logf(t.z);
  c.log_z1 = ::logf(s.z1);
  c.k = (s.m - t.m) * p.inv_t + c.log_zs - c.log_zt;
  c.kl_sm = 0.f;
  // KL(t||s) = E_pt[(t - s) / T] + k and KL(s||t) = E_ps[(s - t) / T] - k.
  if (p.div == Divergence::kForwardKL) {
    c.div = t.w / t.z + c.k;
  } else if (p.div == Divergence::kReverseKL) {
    c.div = s.w / s.z - c.k;
  } else {
    c.div = 0.f;  // JSD needs a second pass: jsd_accumulate, jsd_finish
  }
  return c;
}

C10_HOST_DEVICE inline float log_ps(float s, const RowConsts& c, const LossParams& p) {
  return (s - c.ms) * p.inv_t - c.log_zs;
}

C10_HOST_DEVICE inline float log_pt(float t, const RowConsts& c, const LossParams& p) {
  return (t - c.mt) * p.inv_t - c.log_zt;
}

// log m = log(beta p_t + (1 - beta) p_s), as a log-sum-exp of the two log-probs
// so that it stays finite where both probabilities underflow.
C10_HOST_DEVICE inline float log_mix(float lpt, float lps, const LossParams& p) {
  const float a = lpt + p.log_beta;
  const float b = lps + p.log_1m_beta;
  const float hi = a > b ? a : b;
  const float lo = a > b ? b : a;
  if (hi == neg_inf()) return neg_inf();
  return hi + ::log1pf(::expf(lo - hi));
}

// JSD pass 2: the two row sums KL(p_t || m) and KL(p_s || m).
struct JsdSums {
  float kl_tm;
  float kl_sm;
};

C10_HOST_DEVICE inline void jsd_accumulate(JsdSums& acc, float s, float t, const RowConsts& c,
                                           const LossParams& p) {
  const float lps = log_ps(s, c, p);
  const float lpt = log_pt(t, c, p);
  const float lm = log_mix(lpt, lps, p);
  acc.kl_tm += weighted(::expf(lpt), lpt - lm);
  acc.kl_sm += weighted(::expf(lps), lps - lm);
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
C10_HOST_DEVICE inline float hard_loss(float s_label, const RowConsts& c) {
  return (c.ms - s_label) + c.log_z1;
}

// d loss_i / d s_iv for one element (before the reduction's row weight):
//   alpha * (q - onehot(y)) + (1 - alpha) * soft_scale * dD/ds.
// A term whose weight is 0 is skipped, so it cannot turn a finite gradient NaN.
C10_HOST_DEVICE inline float grad_element(float s, float t, bool is_label, const RowConsts& c,
                                          const LossParams& p) {
  float g = 0.f;
  if (p.has_labels && p.alpha != 0.f) {
    const float q = ::expf((s - c.ms) - c.log_z1);  // softmax(s), exp(-inf) = 0
    g = p.alpha * (q - (is_label ? 1.f : 0.f));
  }
  if (p.soft_coef != 0.f) {
    const float lps = log_ps(s, c, p);
    const float ps = ::expf(lps);
    float dd;
    if (p.div == Divergence::kForwardKL) {
      dd = ps - ::expf(log_pt(t, c, p));
    } else if (p.div == Divergence::kReverseKL) {
      dd = weighted(ps, (s - t) * p.inv_t - c.k - c.div);
    } else {
      const float lm = log_mix(log_pt(t, c, p), lps, p);
      dd = (1.f - p.beta) * weighted(ps, lps - lm - c.kl_sm);
    }
    g += p.soft_coef * p.inv_t * dd;
  }
  return g;
}

}  // namespace kdfused
