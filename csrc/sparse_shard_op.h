// The vocab-parallel phases of the sparse teacher (docs/design.md, "Vocab-parallel"):
// sparse_distill_forward split at the one point where the ranks exchange
// per-row statistics. Each rank holds the shard [column_offset, column_offset +
// V_r) of every student row of a vocabulary of `vocab` ids; the teacher (its
// ids global) and the labels are the same on every rank.
//
//   sparse_shard_stats: per row, this shard's SparseShardStats (8 floats) and
//     the student's logit at each kept id the shard holds (k floats);
//   sparse_shard_merge: the W ranks' rows in rank order -> the whole row's
//     constants, its k + 1 buckets' T dD/ds (RowConsts, the tail's factor and
//     one value per kept id: 12 + k floats), and the rows' hard and soft terms;
//   sparse_shard_grad: this shard's gradient from the merged row.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "parallel_op.h"
#include "sparse_op.h"

namespace kdfused {

#define KDFUSED_SPARSE_PHASE_OPTIONS                                                           \
  "Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, Tensor? grad_scale, "      \
  "float temperature, float store_temperature, str tail, float alpha, str divergence, "        \
  "float beta, int ignore_index, bool scale_by_t2, float label_smoothing, int column_offset, " \
  "int vocab"

// [N, 8 + k] float32: each row's SparseShardStats, then the student's logit
// at each kept id that this shard holds (0 at the others).
constexpr const char* kSparseShardStatsSchema =
    "sparse_shard_stats(" KDFUSED_SPARSE_PHASE_OPTIONS ") -> Tensor";
// The shard's gradient [N, V_r] (student dtype) given the merged rows [N, 12 + k].
constexpr const char* kSparseShardGradSchema =
    "sparse_shard_grad(" KDFUSED_SPARSE_PHASE_OPTIONS ", Tensor merged) -> Tensor";
// [W, N, 8 + k] shard statistics in rank order -> (merged [N, 12 + k], hard
// [N], soft [N]).
constexpr const char* kSparseShardMergeSchema =
    "sparse_shard_merge(Tensor shard_stats, Tensor indices, Tensor logprobs, Tensor? labels, "
    "float temperature, float store_temperature, str tail, float alpha, str divergence, "
    "float beta, int ignore_index, bool scale_by_t2, float label_smoothing) "
    "-> (Tensor, Tensor, Tensor)";

// One shard's part of a row, as plain floats: the student's online softmax
// with the kept ids (those in the shard) out of the tail's sum, label
// smoothing's sum over the shard (s - st.ms; 0 without smoothing), the
// label's logit if the label lies in the shard, and the shard's width.
struct SparseShardStats {
  SparseStats st;
  float sum_below;
  float s_label;
  float has_label;
  float columns;
};
static_assert(sizeof(SparseShardStats) == 8 * sizeof(float), "SparseShardStats is 8 floats");

// Floats per row before the k per-id columns: of the statistics, and of the
// merged row (RowConsts and the tail's factor h_g).
constexpr int64_t kSparseStatsFields = 8;
constexpr int64_t kSparseMergedFields = 12;

#define KDFUSED_SPARSE_PHASE_ARGS \
  KDFUSED_SPARSE_ARGS, double label_smoothing, int64_t column_offset, int64_t vocab
// Their names, to pass them on.
#define KDFUSED_SPARSE_PHASE_NAMES KDFUSED_SPARSE_NAMES, label_smoothing, column_offset, vocab

// A shard's sparse problem: prepare_sparse's checks, the shard within [0,
// vocab), label smoothing's eps / V over the whole vocabulary.
SparseProblem prepare_sparse_shard(KDFUSED_SPARSE_PHASE_ARGS, c10::DeviceType kernel_device);

// merged as [N, 12 + k] contiguous float32 on the student's device, checked.
void check_merged(const at::Tensor& merged, const SparseProblem& prob);

#define KDFUSED_SPARSE_MERGE_ARGS                                                           \
  const at::Tensor &shard_stats, const at::Tensor &indices, const at::Tensor &logprobs,     \
      const std::optional<at::Tensor>&labels, double temperature, double store_temperature, \
      c10::string_view tail, double alpha, c10::string_view divergence, double beta,        \
      int64_t ignore_index, bool scale_by_t2, double label_smoothing

// A merge's checked inputs: the teacher as [N, k] contiguous int64 ids and
// float32 log-probs, the options folded (label smoothing's eps / V per row).
struct SparseMergeProblem {
  at::Tensor indices;
  at::Tensor logprobs;
  LossParams params;
  Tail tail;
  float st_over_t;
  int64_t w, n, k;
};

SparseMergeProblem prepare_sparse_merge(KDFUSED_SPARSE_MERGE_ARGS, c10::DeviceType kernel_device);

at::Tensor sparse_shard_stats_cpu(KDFUSED_SPARSE_PHASE_ARGS);
at::Tensor sparse_shard_grad_cpu(KDFUSED_SPARSE_PHASE_ARGS, const at::Tensor& merged);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_shard_merge_cpu(KDFUSED_SPARSE_MERGE_ARGS);
at::Tensor sparse_shard_stats_cuda(KDFUSED_SPARSE_PHASE_ARGS);
at::Tensor sparse_shard_grad_cuda(KDFUSED_SPARSE_PHASE_ARGS, const at::Tensor& merged);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_shard_merge_cuda(KDFUSED_SPARSE_MERGE_ARGS);

// The whole vocabulary of a row's statistics: the sum of the W shards' widths
// (rows [W, N, 8 + k], row i).
C10_HOST_DEVICE inline int64_t sparse_row_vocab(const float* stats, int64_t i, int64_t n, int64_t w,
                                                int64_t k) {
  const int64_t width = kSparseStatsFields + k;
  int64_t v = 0;
  for (int64_t r = 0; r < w; ++r) {
    v += static_cast<int64_t>(
        reinterpret_cast<const SparseShardStats*>(stats + (r * n + i) * width)->columns);
  }
  return v;
}

// The per-row work of the merge, one definition for both devices. Row i of N:
// W shards at stats[(r * N + i) * (8 + k)], merged in rank order; the
// teacher's row at idx[i * k], lp[i * k] (ids checked by the caller); lb: k
// floats of scratch. Writes merged[i] (RowConsts, h_g, then at each kept
// entry j its T dD/ds and 0 at padding), hard[i] and soft[i].
C10_HOST_DEVICE inline void sparse_merge_row(int64_t i, int64_t n, int64_t w, int64_t k,
                                             const float* stats, const int64_t* idx,
                                             const float* lp, const int64_t* labels, LossParams p,
                                             double label_smoothing, Tail tail, float st_over_t,
                                             float* lb, float* merged, float* hard, float* soft) {
  const int64_t width = kSparseStatsFields + k;
  float* out = merged + i * (kSparseMergedFields + k);
  float* x = out + kSparseMergedFields;
  if (labels && labels[i] == p.ignore_index) {
    for (int64_t j = 0; j < kSparseMergedFields + k; ++j) out[j] = 0.f;
    hard[i] = soft[i] = 0.f;
    return;
  }
  const auto shard = [&](int64_t r) {
    return reinterpret_cast<const SparseShardStats*>(stats + (r * n + i) * width);
  };
  SparseStats st = shard(0)->st;
  for (int64_t r = 1; r < w; ++r) st = sparse_merge(st, shard(r)->st, p.inv_t);
  // Label smoothing's sum relative to the merged max (as merge_shards), the
  // label's logit, the vocabulary.
  float sum_below = 0.f, s_label = 0.f, columns = 0.f;
  for (int64_t r = 0; r < w; ++r) {
    const SparseShardStats& x_r = *shard(r);
    const float shift = x_r.st.ms == st.ms ? 0.f : weighted(x_r.columns, below(x_r.st.ms, st.ms));
    sum_below += x_r.sum_below + shift;
    if (x_r.has_label != 0.f) s_label = x_r.s_label;
    columns += x_r.columns;
  }
  p.smooth_weight = static_cast<float>(label_smoothing / static_cast<double>(columns));
  SparseConsts sc = sparse_consts(st, p);
  RowConsts c = sc.c;
  if (labels && p.smoothing) c.sum_below = sum_below;
  // The kept entries, compacted: each one's logit from the shard that holds it
  // (found from the shards' widths), its log p_s, its stored log-prob.
  int64_t kept = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t id = idx[i * k + j];
    if (id < 0) continue;
    float s_id = 0.f;
    int64_t start = 0;
    for (int64_t r = 0; r < w; ++r) {
      const int64_t end = start + static_cast<int64_t>(shard(r)->columns);
      if (id < end) {
        s_id = stats[(r * n + i) * width + kSparseStatsFields + j];
        break;
      }
      start = end;
    }
    lb[kept] = log_ps(s_id, c, p);
    x[kept] = lp[i * k + j];
    ++kept;
  }
  const int64_t v = static_cast<int64_t>(columns);
  const SparseRow row = sparse_buckets(lb, x, kept, sc.log_tail, kept == v, tail, st_over_t, p);
  hard[i] = labels ? hard_loss(s_label, c, p) : 0.f;
  soft[i] = p.soft_scale * row.div;
  // Each kept entry's T dD/ds back at its own column (last first: entry m of
  // the compacted list goes to a column j >= m), 0 at padding.
  for (int64_t j = k - 1; j >= 0; --j) {
    if (idx[i * k + j] >= 0) {
      --kept;
      x[j] = x[kept];
    } else {
      x[j] = 0.f;
    }
  }
  c.div = row.div;
  *reinterpret_cast<RowConsts*>(out) = c;
  out[kSparseMergedFields - 1] = row.tail_coef;
}

}  // namespace kdfused
