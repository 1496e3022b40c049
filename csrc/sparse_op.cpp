#include "sparse_op.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace kdfused {

namespace {

Tail parse_tail(c10::string_view name) {
  if (name == "ghost") return Tail::kGhost;
  if (name == "renormalize") return Tail::kRenormalize;
  TORCH_CHECK_VALUE(false, "kdfused: tail must be 'ghost' or 'renormalize', got '",
                    std::string(name.data(), name.size()), "'");
}

}  // namespace

SparseProblem prepare_sparse(KDFUSED_SPARSE_ARGS, c10::DeviceType kernel_device,
                             double label_smoothing) {
  SparseProblem prob;
  prob.base = prepare_student(student, labels, grad_scale, temperature, alpha, divergence, beta,
                              ignore_index, scale_by_t2, kernel_device, label_smoothing);
  const int64_t n = prob.base.n;
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "kdfused: the sparse teacher's indices must be int32 or int64, got ",
                   c10::toString(indices.scalar_type()));
  TORCH_CHECK_TYPE(logprobs.scalar_type() == at::kFloat || logprobs.scalar_type() == at::kHalf ||
                       logprobs.scalar_type() == at::kBFloat16,
                   "kdfused: the sparse teacher's logprobs must be float32, float16 or bfloat16, "
                   "got ",
                   c10::toString(logprobs.scalar_type()));
  TORCH_CHECK_VALUE(
      indices.dim() == 2 && indices.size(0) == n && indices.sizes() == logprobs.sizes(),
      "kdfused: the sparse teacher's indices and logprobs must both be [N, k] with "
      "N = ",
      text(n), ", got ", text(indices.sizes()), " and ", text(logprobs.sizes()));
  TORCH_CHECK_VALUE(indices.device() == student.device() && logprobs.device() == student.device(),
                    "kdfused: the sparse teacher must be on the student's device ",
                    student.device().str(), ", got indices on ", indices.device().str(),
                    " and logprobs on ", logprobs.device().str());
  TORCH_CHECK_VALUE(std::isfinite(store_temperature) && store_temperature > 0.0,
                    "kdfused: store_temperature must be finite and > 0, got ",
                    text(store_temperature));
  prob.tail = parse_tail(tail);
  TORCH_CHECK_VALUE(prob.tail == Tail::kGhost || prob.base.params.div == Divergence::kForwardKL,
                    "kdfused: tail='renormalize' is defined for divergence='forward_kl' only "
                    "(DESIGN.md section 6), got '",
                    std::string(divergence.data(), divergence.size()), "'");
  prob.k = indices.size(1);
  prob.indices = indices.to(at::kLong).contiguous();
  prob.logprobs = logprobs.to(at::kFloat).contiguous();
  prob.st_over_t = static_cast<float>(store_temperature / temperature);
  return prob;
}

at::Tensor prepare_topk(const at::Tensor& logits, int64_t k, double temperature,
                        c10::DeviceType kernel_device) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) > 0,
                    "kdfused: sparse_topk takes [N, V] logits with V > 0, got shape ",
                    text(logits.sizes()));
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                       logits.scalar_type() == at::kBFloat16,
                   "kdfused: sparse_topk takes float32, float16 or bfloat16 logits, got ",
                   c10::toString(logits.scalar_type()));
  TORCH_CHECK_VALUE(logits.device().type() == kernel_device, "kdfused: the ",
                    c10::DeviceTypeName(kernel_device), " kernel got ", logits.device().str(),
                    " tensors");
  TORCH_CHECK_VALUE(k >= 1 && k <= logits.size(1),
                    "kdfused: k must lie in [1, V] with V = ", text(logits.size(1)), ", got ",
                    text(k));
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "kdfused: temperature must be finite and > 0, got ", text(temperature));
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

}  // namespace kdfused
