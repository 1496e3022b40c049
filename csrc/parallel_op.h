// The vocab-parallel ops (docs/design.md, "Vocab-parallel"): the fused kernel split into a
// statistics phase, whose per-row results the ranks exchange, a merge, JSD's
// second sums (and their merge), and a gradient phase that takes the merged
// row constants. Each rank runs the phases on its shard [column_offset,
// column_offset + V_r) of a vocabulary of `vocab` ids; labels are global ids.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "distill_op.h"

namespace kdfused {

#define KDFUSED_PHASE_OPTIONS                                                               \
  "Tensor student, Tensor teacher, Tensor? labels, Tensor? grad_scale, float temperature, " \
  "float alpha, str divergence, float beta, int ignore_index, bool scale_by_t2, "           \
  "float label_smoothing, int column_offset, int vocab"

// [N, 12] float32: each row's ShardStats (kdfused_math.h).
constexpr const char* kDistillStatsSchema = "distill_stats(" KDFUSED_PHASE_OPTIONS ") -> Tensor";
// [N, 2] float32: the shard's JSD sums (KL(p_t || m), KL(p_s || m)) given the
// merged constants [N, 11].
constexpr const char* kDistillJsdSumsSchema =
    "distill_jsd_sums(" KDFUSED_PHASE_OPTIONS ", Tensor consts) -> Tensor";
// The shard's gradient [N, V_r] (student dtype) given the merged constants.
constexpr const char* kDistillGradSchema =
    "distill_grad(" KDFUSED_PHASE_OPTIONS ", Tensor consts) -> Tensor";
// [W, N, 12] shard statistics in rank order -> (consts [N, 11], hard [N],
// soft [N]); soft is 0 for JSD until distill_jsd_finish.
constexpr const char* kDistillMergeSchema =
    "distill_merge(Tensor shard_stats, Tensor? labels, float temperature, float alpha, "
    "str divergence, float beta, int ignore_index, bool scale_by_t2, float label_smoothing) "
    "-> (Tensor, Tensor, Tensor)";
// consts [N, 11] and [W, N, 2] JSD sums in rank order -> (consts, soft [N]).
constexpr const char* kDistillJsdFinishSchema =
    "distill_jsd_finish(Tensor consts, Tensor shard_sums, Tensor? labels, float temperature, "
    "float beta, int ignore_index, bool scale_by_t2) -> (Tensor, Tensor)";

#define KDFUSED_PHASE_ARGS \
  KDFUSED_KERNEL_ARGS, double label_smoothing, int64_t column_offset, int64_t vocab
// Their names, to pass them on.
#define KDFUSED_PHASE_NAMES KDFUSED_KERNEL_NAMES, label_smoothing, column_offset, vocab

// A shard's problem: prepare_problem's checks, the shard within [0, vocab),
// label smoothing's eps / V over the whole vocabulary; labels are checked
// against [0, vocab) by the kernels.
DistillProblem prepare_shard(KDFUSED_PHASE_ARGS, c10::DeviceType kernel_device);

// consts as [N, 11] float32 on the student's device, checked.
void check_consts(const at::Tensor& consts, const DistillProblem& prob);

at::Tensor distill_stats_cpu(KDFUSED_PHASE_ARGS);
at::Tensor distill_jsd_sums_cpu(KDFUSED_PHASE_ARGS, const at::Tensor& consts);
at::Tensor distill_grad_cpu(KDFUSED_PHASE_ARGS, const at::Tensor& consts);
at::Tensor distill_stats_cuda(KDFUSED_PHASE_ARGS);
at::Tensor distill_jsd_sums_cuda(KDFUSED_PHASE_ARGS, const at::Tensor& consts);
at::Tensor distill_grad_cuda(KDFUSED_PHASE_ARGS, const at::Tensor& consts);

#define KDFUSED_MERGE_ARGS                                                                   \
  const at::Tensor &shard_stats, const std::optional<at::Tensor>&labels, double temperature, \
      double alpha, c10::string_view divergence, double beta, int64_t ignore_index,          \
      bool scale_by_t2, double label_smoothing
#define KDFUSED_JSD_FINISH_ARGS                                                                   \
  const at::Tensor &consts, const at::Tensor &shard_sums, const std::optional<at::Tensor>&labels, \
      double temperature, double beta, int64_t ignore_index, bool scale_by_t2

// Optional [N] int64 labels made contiguous for a merge, and their data
// (nullptr without labels).
struct ContiguousLabels {
  explicit ContiguousLabels(const std::optional<at::Tensor>& labels)
      : tensor(labels ? labels->contiguous() : at::Tensor()) {}
  const int64_t* data() const {
    return tensor.defined() ? tensor.const_data_ptr<int64_t>() : nullptr;
  }
  at::Tensor tensor;
};

// The merges' LossParams (label smoothing's eps / V is set per row by merge_row).
LossParams merge_params(KDFUSED_MERGE_ARGS);

// The merges, on any device (the CUDA ones in parallel_cuda.cu).
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_merge_cpu(KDFUSED_MERGE_ARGS);
std::tuple<at::Tensor, at::Tensor> distill_jsd_finish_cpu(KDFUSED_JSD_FINISH_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_merge_cuda(KDFUSED_MERGE_ARGS);
std::tuple<at::Tensor, at::Tensor> distill_jsd_finish_cuda(KDFUSED_JSD_FINISH_ARGS);

// The per-row work of the merges, one definition for both devices.
// Row i of N: W shards at stats[(r * N + i) * 12]; writes consts[i], hard[i], soft[i].
C10_HOST_DEVICE inline void merge_row(int64_t i, int64_t n, int64_t w, const float* stats,
                                      const int64_t* labels, LossParams p, double label_smoothing,
                                      float* consts, float* hard, float* soft) {
  const auto* shards = reinterpret_cast<const ShardStats*>(stats);
  RowConsts* c = reinterpret_cast<RowConsts*>(consts) + i;
  if (labels && labels[i] == p.ignore_index) {
    *c = RowConsts{};
    hard[i] = soft[i] = 0.f;
    return;
  }
  const ShardStats m = merge_shards(shards + i, w, n, p.inv_t);
  p.smooth_weight = static_cast<float>(label_smoothing / static_cast<double>(m.columns));
  *c = row_consts(m.st, p);
  c->sum_below = m.sum_below;
  hard[i] = labels ? hard_loss(m.s_label, *c, p) : 0.f;
  soft[i] = p.soft_scale * c->div;
}

// Row i's JSD sums over W shards ([W, N, 2]) added in rank order.
C10_HOST_DEVICE inline void jsd_finish_row(int64_t i, int64_t n, int64_t w, const float* sums,
                                           const int64_t* labels, const LossParams& p,
                                           float* consts, float* soft) {
  if (labels && labels[i] == p.ignore_index) {
    soft[i] = 0.f;
    return;
  }
  JsdSums acc{0.f, 0.f};
  for (int64_t r = 0; r < w; ++r) {
    acc = jsd_merge(acc, JsdSums{sums[(r * n + i) * 2], sums[(r * n + i) * 2 + 1]});
  }
  RowConsts* c = reinterpret_cast<RowConsts*>(consts) + i;
  jsd_finish(*c, acc, p);
  soft[i] = p.soft_scale * c->div;
}

}  // namespace kdfused
