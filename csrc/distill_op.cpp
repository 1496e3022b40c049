#include "distill_op.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <limits>

namespace kdfused {

std::string text(int64_t x) { return std::to_string(x); }

std::string text(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}

std::string text(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + text(shape[i]);
  return out + "]";
}

std::string text(const at::Tensor& t) {
  return "shape " + text(t.sizes()) + ", dtype " + c10::toString(t.scalar_type()) + ", device " +
         t.device().str();
}

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

Divergence parse_divergence(c10::string_view name) {
  if (name == "forward_kl") return Divergence::kForwardKL;
  if (name == "reverse_kl") return Divergence::kReverseKL;
  if (name == "jsd") return Divergence::kJSD;
  TORCH_CHECK_VALUE(false,
                    "kdfused: divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', got '",
                    std::string(name.data(), name.size()), "'");
}

}  // namespace

Divergence divergence_of(c10::string_view name) { return parse_divergence(name); }

LossParams make_params(double temperature, double alpha, Divergence div, double beta,
                       int64_t ignore_index, bool scale_by_t2, bool has_labels,
                       double label_smoothing, int64_t vocab) {
  LossParams p;
  const double soft_scale = scale_by_t2 ? temperature * temperature : 1.0;
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.alpha = static_cast<float>(alpha);
  p.soft_scale = static_cast<float>(soft_scale);
  p.soft_coef = static_cast<float>((1.0 - alpha) * soft_scale);
  p.beta = static_cast<float>(beta);
  p.div = div;
  p.ignore_index = ignore_index;
  p.has_labels = has_labels;
  p.t_is_2 = temperature == 2.0;
  p.t_is_1 = temperature == 1.0;
  p.label_weight = static_cast<float>(1.0 - label_smoothing);
  p.smooth_weight = static_cast<float>(label_smoothing / static_cast<double>(vocab));
  p.smoothing = label_smoothing > 0.0;
  return p;
}

DistillProblem prepare_student(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& grad_scale, double temperature,
                               double alpha, c10::string_view divergence, double beta,
                               int64_t ignore_index, bool scale_by_t2,
                               c10::DeviceType kernel_device, double label_smoothing) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kdfused: student logits must be [N, V], got shape ",
                    text(student.sizes()));
  TORCH_CHECK_VALUE(student.size(1) > 0, "kdfused: the vocabulary dim V must be > 0, got shape ",
                    text(student.sizes()));
  TORCH_CHECK_TYPE(is_supported_dtype(student.scalar_type()),
                   "kdfused: the fused kernels take float32, float16 or bfloat16 logits, got "
                   "student ",
                   c10::toString(student.scalar_type()));
  TORCH_CHECK_VALUE(student.device().type() == kernel_device, "kdfused: the ",
                    c10::DeviceTypeName(kernel_device), " kernel got ", student.device().str(),
                    " tensors");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "kdfused: temperature must be finite and > 0, got ", text(temperature));
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "kdfused: alpha must lie in [0, 1], got ",
                    text(alpha));
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "kdfused: beta must lie in (0, 1), got ", text(beta));
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "kdfused: label_smoothing must lie in [0, 1], got ", text(label_smoothing));

  DistillProblem prob;
  prob.n = student.size(0);
  prob.v = student.size(1);
  // Rows may be strided (e.g. a slice of a wider buffer); elements may not.
  prob.student = student.stride(1) == 1 ? student : student.contiguous();

  if (labels.has_value()) {
    const at::Tensor& y = *labels;
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong, "kdfused: labels must be int64, got ",
                     c10::toString(y.scalar_type()));
    TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == prob.n,
                      "kdfused: labels must have shape [N] = [", text(prob.n), "], got ",
                      text(y.sizes()));
    TORCH_CHECK_VALUE(y.device() == student.device(),
                      "kdfused: labels must be on the logits' device ", student.device().str(),
                      ", got ", y.device().str());
    prob.labels = y.contiguous();
  } else {
    TORCH_CHECK_VALUE(alpha == 0.0,
                      "kdfused: labels=None requires alpha == 0, got alpha = ", text(alpha));
  }
  if (grad_scale.has_value()) {
    const at::Tensor& g = *grad_scale;
    TORCH_CHECK_VALUE(
        g.dim() == 0 && g.scalar_type() == at::kFloat && g.device() == student.device(),
        "kdfused: grad_scale must be a 0-d float32 tensor on ", student.device().str(), ", got ",
        text(g));
    prob.grad_scale = g;
  }

  prob.params = make_params(temperature, alpha, parse_divergence(divergence), beta, ignore_index,
                            scale_by_t2, labels.has_value(), label_smoothing, prob.v);
  return prob;
}

DistillProblem prepare_problem(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& grad_scale, double temperature,
                               double alpha, c10::string_view divergence, double beta,
                               int64_t ignore_index, bool scale_by_t2,
                               c10::DeviceType kernel_device, double label_smoothing) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kdfused: student logits must be [N, V], got shape ",
                    text(student.sizes()));
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(),
                    "kdfused: student and teacher logits must have the same shape, got ",
                    text(student.sizes()), " and ", text(teacher.sizes()));
  TORCH_CHECK_TYPE(
      is_supported_dtype(student.scalar_type()) && is_supported_dtype(teacher.scalar_type()),
      "kdfused: the fused kernels take float32, float16 or bfloat16 logits, got "
      "student ",
      c10::toString(student.scalar_type()), " and teacher ", c10::toString(teacher.scalar_type()));
  TORCH_CHECK_VALUE(student.device() == teacher.device(),
                    "kdfused: student and teacher logits must be on the same device, got ",
                    student.device().str(), " and ", teacher.device().str());
  DistillProblem prob =
      prepare_student(student, labels, grad_scale, temperature, alpha, divergence, beta,
                      ignore_index, scale_by_t2, kernel_device, label_smoothing);
  prob.teacher = teacher.stride(1) == 1 ? teacher : teacher.contiguous();
  return prob;
}

void check_row_count(int64_t n) {
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int32_t>::max(),
                    "kdfused: at most 2^31 - 1 rows per call, got N = ", text(n));
}

DistillResult allocate_outputs(const DistillProblem& prob, bool compute_grad,
                               const at::Tensor* grad_out) {
  const auto rows = prob.student.options().dtype(at::kFloat);
  at::Tensor hard = at::empty({prob.n}, rows);
  at::Tensor soft = at::empty({prob.n}, rows);
  if (grad_out != nullptr) {
    const at::Tensor& g = *grad_out;
    TORCH_CHECK_VALUE(
        g.dim() == 2 && g.size(0) == prob.n && g.size(1) == prob.v && g.is_contiguous() &&
            g.scalar_type() == prob.student.scalar_type() && g.device() == prob.student.device(),
        "kdfused: grad must be a contiguous [N, V] = ", text(prob.student.sizes()),
        " tensor of the student's dtype and device (", c10::toString(prob.student.scalar_type()),
        ", ", prob.student.device().str(), "), got ", text(g));
    return {hard, soft, g};
  }
  at::Tensor grad = compute_grad ? at::empty({prob.n, prob.v}, prob.student.options())
                                 : at::empty({0}, prob.student.options());
  return {hard, soft, grad};
}

at::Tensor allocate_entropy(const DistillProblem& prob, bool wanted) {
  return at::empty({wanted ? prob.n : 0}, prob.student.options().dtype(at::kFloat));
}

}  // namespace kdfused
