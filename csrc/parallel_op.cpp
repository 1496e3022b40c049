#include "parallel_op.h"

#include <ATen/ATen.h>

namespace kdfused {

DistillProblem prepare_shard(KDFUSED_PHASE_ARGS, c10::DeviceType kernel_device) {
  DistillProblem prob = prepare_problem(KDFUSED_KERNEL_NAMES, kernel_device, label_smoothing);
  TORCH_CHECK_VALUE(column_offset >= 0 && prob.v <= vocab - column_offset, "kdfused: a shard of ",
                    text(prob.v), " columns at offset ", text(column_offset),
                    " does not fit a vocabulary of ", text(vocab));
  prob.params.smooth_weight = static_cast<float>(label_smoothing / static_cast<double>(vocab));
  return prob;
}

void check_consts(const at::Tensor& consts, const DistillProblem& prob) {
  TORCH_CHECK_VALUE(consts.dim() == 2 && consts.size(0) == prob.n && consts.size(1) == 11 &&
                        consts.scalar_type() == at::kFloat &&
                        consts.device() == prob.student.device() && consts.is_contiguous(),
                    "kdfused: consts must be a contiguous [N, 11] float32 tensor on the logits' "
                    "device with N = ",
                    text(prob.n), ", got ", text(consts));
}

namespace {

void check_merge_inputs(const at::Tensor& x, int64_t fields, const char* name,
                        const std::optional<at::Tensor>& labels) {
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) >= 1 && x.size(2) == fields &&
                        x.scalar_type() == at::kFloat && x.is_contiguous(),
                    "kdfused: ", name, " must be a contiguous [W, N, ", text(fields),
                    "] float32 tensor, got ", text(x));
  if (labels) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == x.size(1) &&
                          labels->scalar_type() == at::kLong && labels->device() == x.device(),
                      "kdfused: labels must be [N] int64 on ", x.device().str(), ", got ",
                      text(*labels));
  }
}

}  // namespace

LossParams merge_params(KDFUSED_MERGE_ARGS) {
  (void)shard_stats;
  return make_params(temperature, alpha, divergence_of(divergence), beta, ignore_index, scale_by_t2,
                     labels.has_value(), label_smoothing, 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_merge_cpu(KDFUSED_MERGE_ARGS) {
  check_merge_inputs(shard_stats, 12, "shard_stats", labels);
  const int64_t w = shard_stats.size(0), n = shard_stats.size(1);
  const LossParams p = merge_params(shard_stats, labels, temperature, alpha, divergence, beta,
                                    ignore_index, scale_by_t2, label_smoothing);
  const auto opts = shard_stats.options();
  at::Tensor consts = at::empty({n, 11}, opts);
  at::Tensor hard = at::empty({n}, opts);
  at::Tensor soft = at::empty({n}, opts);
  const ContiguousLabels y(labels);
  for (int64_t i = 0; i < n; ++i) {
    merge_row(i, n, w, shard_stats.const_data_ptr<float>(), y.data(), p, label_smoothing,
              consts.data_ptr<float>(), hard.data_ptr<float>(), soft.data_ptr<float>());
  }
  return {consts, hard, soft};
}

std::tuple<at::Tensor, at::Tensor> distill_jsd_finish_cpu(KDFUSED_JSD_FINISH_ARGS) {
  check_merge_inputs(shard_sums, 2, "shard_sums", labels);
  const int64_t w = shard_sums.size(0), n = shard_sums.size(1);
  TORCH_CHECK_VALUE(consts.dim() == 2 && consts.size(0) == n && consts.size(1) == 11 &&
                        consts.scalar_type() == at::kFloat,
                    "kdfused: consts must be [N, 11] float32, got ", text(consts));
  const LossParams p = make_params(temperature, 0.0, Divergence::kJSD, beta, ignore_index,
                                   scale_by_t2, labels.has_value(), 0.0, 1);
  at::Tensor out = consts.clone(at::MemoryFormat::Contiguous);
  at::Tensor soft = at::empty({n}, consts.options());
  const ContiguousLabels y(labels);
  for (int64_t i = 0; i < n; ++i) {
    jsd_finish_row(i, n, w, shard_sums.const_data_ptr<float>(), y.data(), p, out.data_ptr<float>(),
                   soft.data_ptr<float>());
  }
  return {out, soft};
}

}  // namespace kdfused
