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
                             double label_smoothing, const std::optional<at::Tensor>& offsets) {
  SparseProblem prob;
  prob.base = prepare_student(student, labels, grad_scale, temperature, alpha, divergence, beta,
                              ignore_index, scale_by_t2, kernel_device, label_smoothing);
  const int64_t n = prob.base.n;
  const at::ScalarType id_type = indices.scalar_type();
  TORCH_CHECK_TYPE(id_type == at::kLong || id_type == at::kInt || id_type == at::kUInt16,
                   "kdfused: the sparse teacher's indices must be int64, int32 or uint16, got ",
                   c10::toString(id_type));
  TORCH_CHECK_TYPE(logprobs.scalar_type() == at::kFloat || logprobs.scalar_type() == at::kHalf ||
                       logprobs.scalar_type() == at::kBFloat16,
                   "kdfused: the sparse teacher's logprobs must be float32, float16 or bfloat16, "
                   "got ",
                   c10::toString(logprobs.scalar_type()));
  TORCH_CHECK_VALUE(indices.device() == student.device() && logprobs.device() == student.device(),
                    "kdfused: the sparse teacher must be on the student's device ",
                    student.device().str(), ", got indices on ", indices.device().str(),
                    " and logprobs on ", logprobs.device().str());
  if (offsets) {
    const at::Tensor& off = *offsets;
    TORCH_CHECK_TYPE(off.scalar_type() == at::kLong,
                     "kdfused: the ragged teacher's offsets must be int64, got ",
                     c10::toString(off.scalar_type()));
    TORCH_CHECK_VALUE(off.dim() == 1 && off.size(0) == n + 1 && indices.dim() == 1 &&
                          indices.sizes() == logprobs.sizes(),
                      "kdfused: a ragged teacher takes indices and logprobs [total] and offsets "
                      "[N + 1] with N = ",
                      text(n), ", got ", text(indices.sizes()), ", ", text(logprobs.sizes()),
                      " and ", text(off.sizes()));
    TORCH_CHECK_VALUE(off.device() == student.device(),
                      "kdfused: the ragged teacher's offsets must be on the student's device ",
                      student.device().str(), ", got ", off.device().str());
    prob.offsets = off.contiguous();
    // offsets[0], offsets[N], the smallest and the largest row, in one copy.
    const at::Tensor& o = *prob.offsets;
    const at::Tensor steps = n > 0 ? o.slice(0, 1) - o.slice(0, 0, n) : at::zeros({1}, o.options());
    const at::Tensor summary =
        at::stack({o.select(0, 0), o.select(0, n), steps.min(), steps.max()}).to(at::kCPU);
    const int64_t* sm = summary.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(sm[0] == 0 && sm[1] == indices.size(0) && sm[2] >= 0,
                      "kdfused: the ragged teacher's offsets must start at 0, never decrease and "
                      "end at the number of entries ",
                      text(indices.size(0)), ", got offsets[0] = ", text(sm[0]),
                      ", offsets[N] = ", text(sm[1]), " and a smallest step of ", text(sm[2]));
    prob.k = sm[3];
  } else {
    TORCH_CHECK_VALUE(
        indices.dim() == 2 && indices.size(0) == n && indices.sizes() == logprobs.sizes(),
        "kdfused: the sparse teacher's indices and logprobs must both be [N, k] with "
        "N = ",
        text(n), ", got ", text(indices.sizes()), " and ", text(logprobs.sizes()));
    prob.k = indices.size(1);
  }
  TORCH_CHECK_VALUE(std::isfinite(store_temperature) && store_temperature > 0.0,
                    "kdfused: store_temperature must be finite and > 0, got ",
                    text(store_temperature));
  prob.tail = parse_tail(tail);
  TORCH_CHECK_VALUE(prob.tail == Tail::kGhost || prob.base.params.div == Divergence::kForwardKL,
                    "kdfused: tail='renormalize' is defined for divergence='forward_kl' only "
                    "(docs/design.md, \"The sparse teacher\"), got '",
                    std::string(divergence.data(), divergence.size()), "'");
  prob.indices = indices.contiguous();
  prob.logprobs = logprobs.contiguous();
  prob.st_over_t = static_cast<float>(store_temperature / temperature);
  return prob;
}

TeacherEntries SparseProblem::entries() const {
  const at::ScalarType it = indices.scalar_type(), lt = logprobs.scalar_type();
  return TeacherEntries{indices.const_data_ptr(),
                        logprobs.const_data_ptr(),
                        offsets ? offsets->const_data_ptr<int64_t>() : nullptr,
                        k,
                        it == at::kLong  ? IdType::kInt64
                        : it == at::kInt ? IdType::kInt32
                                         : IdType::kUInt16,
                        lt == at::kFloat  ? LogprobType::kFloat
                        : lt == at::kHalf ? LogprobType::kHalf
                                          : LogprobType::kBFloat16};
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
