#include "sparse_shard_op.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace kdfused {

SparseProblem prepare_sparse_shard(KDFUSED_SPARSE_PHASE_ARGS, c10::DeviceType kernel_device) {
  SparseProblem prob = prepare_sparse(KDFUSED_SPARSE_NAMES, kernel_device, label_smoothing);
  // The phase kernels read padded int64 ids and float32 log-probs (prepare_sparse keeps the
  // dtypes a teacher came in; the phases' rows are small, so convert them here).
  prob.indices = prob.indices.to(at::kLong).contiguous();
  prob.logprobs = prob.logprobs.to(at::kFloat).contiguous();
  const int64_t v = prob.base.v;
  TORCH_CHECK_VALUE(column_offset >= 0 && v <= vocab - column_offset, "kdfused: a shard of ",
                    text(v), " columns at offset ", text(column_offset),
                    " does not fit a vocabulary of ", text(vocab));
  prob.base.params.smooth_weight = static_cast<float>(label_smoothing / static_cast<double>(vocab));
  return prob;
}

void check_merged(const at::Tensor& merged, const SparseProblem& prob) {
  TORCH_CHECK_VALUE(merged.dim() == 2 && merged.size(0) == prob.base.n &&
                        merged.size(1) == kSparseMergedFields + prob.k &&
                        merged.scalar_type() == at::kFloat &&
                        merged.device() == prob.base.student.device() && merged.is_contiguous(),
                    "kdfused: merged must be a contiguous [N, 12 + k] float32 tensor on the "
                    "logits' device with N = ",
                    text(prob.base.n), " and k = ", text(prob.k), ", got ", text(merged));
}

SparseMergeProblem prepare_sparse_merge(KDFUSED_SPARSE_MERGE_ARGS, c10::DeviceType kernel_device) {
  TORCH_CHECK_VALUE(shard_stats.dim() == 3 && shard_stats.size(0) >= 1 &&
                        shard_stats.size(2) >= kSparseStatsFields &&
                        shard_stats.scalar_type() == at::kFloat && shard_stats.is_contiguous(),
                    "kdfused: shard_stats must be a contiguous [W, N, 8 + k] float32 tensor, got ",
                    text(shard_stats));
  TORCH_CHECK_VALUE(shard_stats.device().type() == kernel_device, "kdfused: the ",
                    c10::DeviceTypeName(kernel_device), " kernel got ", shard_stats.device().str(),
                    " tensors");
  SparseMergeProblem prob;
  prob.w = shard_stats.size(0);
  prob.n = shard_stats.size(1);
  prob.k = shard_stats.size(2) - kSparseStatsFields;
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "kdfused: the sparse teacher's indices must be int32 or int64, got ",
                   c10::toString(indices.scalar_type()));
  TORCH_CHECK_TYPE(logprobs.scalar_type() == at::kFloat || logprobs.scalar_type() == at::kHalf ||
                       logprobs.scalar_type() == at::kBFloat16,
                   "kdfused: the sparse teacher's logprobs must be float32, float16 or bfloat16, "
                   "got ",
                   c10::toString(logprobs.scalar_type()));
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == prob.n && indices.size(1) == prob.k &&
                        indices.sizes() == logprobs.sizes(),
                    "kdfused: the sparse teacher's indices and logprobs must both be [N, k] with "
                    "N = ",
                    text(prob.n), " and k = ", text(prob.k), " (shard_stats [W, N, 8 + k]), got ",
                    text(indices.sizes()), " and ", text(logprobs.sizes()));
  TORCH_CHECK_VALUE(
      indices.device() == shard_stats.device() && logprobs.device() == shard_stats.device(),
      "kdfused: the sparse teacher must be on shard_stats' device ", shard_stats.device().str(),
      ", got indices on ", indices.device().str(), " and logprobs on ", logprobs.device().str());
  if (labels) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == prob.n &&
                          labels->scalar_type() == at::kLong &&
                          labels->device() == shard_stats.device(),
                      "kdfused: labels must be [N] int64 on ", shard_stats.device().str(), ", got ",
                      text(*labels));
  } else {
    TORCH_CHECK_VALUE(alpha == 0.0,
                      "kdfused: labels=None requires alpha == 0, got alpha = ", text(alpha));
  }
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "kdfused: temperature must be finite and > 0, got ", text(temperature));
  TORCH_CHECK_VALUE(std::isfinite(store_temperature) && store_temperature > 0.0,
                    "kdfused: store_temperature must be finite and > 0, got ",
                    text(store_temperature));
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "kdfused: alpha must lie in [0, 1], got ",
                    text(alpha));
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "kdfused: beta must lie in (0, 1), got ", text(beta));
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "kdfused: label_smoothing must lie in [0, 1], got ", text(label_smoothing));
  if (tail == "ghost") {
    prob.tail = Tail::kGhost;
  } else if (tail == "renormalize") {
    prob.tail = Tail::kRenormalize;
  } else {
    TORCH_CHECK_VALUE(false, "kdfused: tail must be 'ghost' or 'renormalize', got '",
                      std::string(tail.data(), tail.size()), "'");
  }
  prob.params = make_params(temperature, alpha, divergence_of(divergence), beta, ignore_index,
                            scale_by_t2, labels.has_value(), label_smoothing, 1);
  TORCH_CHECK_VALUE(prob.tail == Tail::kGhost || prob.params.div == Divergence::kForwardKL,
                    "kdfused: tail='renormalize' is defined for divergence='forward_kl' only "
                    "(docs/design.md, \"The sparse teacher\"), got '",
                    std::string(divergence.data(), divergence.size()), "'");
  prob.indices = indices.to(at::kLong).contiguous();
  prob.logprobs = logprobs.to(at::kFloat).contiguous();
  prob.st_over_t = static_cast<float>(store_temperature / temperature);
  return prob;
}

}  // namespace kdfused
