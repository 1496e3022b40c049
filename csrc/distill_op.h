// The device-independent half of the kdfused::distill_forward op: the contract
// checks every backend relies on, and the declarations of the per-device kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

#include "kdfused_math.h"

namespace kdfused {

// Numbers, shapes and devices for error messages, formatted without iostream
// (std::to_string / snprintf). Under torch 2.11.0+cu130 with Python 3.12 and
// g++ 13.3, any extension code that formats a number with an ostream, c10::str
// and so every TORCH_CHECK message with a number argument included, kills the
// process with SIGSEGV; strings are fine (docs/gpu-runs.md). So every TORCH_CHECK in
// csrc/ passes its values through text() or as plain strings.
std::string text(int64_t x);
std::string text(double x);
std::string text(at::IntArrayRef shape);
std::string text(const at::Tensor& t);  // "shape [2, 3], dtype Float, device cpu"

// The ops' schemas; registration.cpp defines them under the kdfused namespace.
// distill_forward returns (hard_rows, soft_rows, grad, entropy_rows): see the
// kernels' contract below. distill_forward_out writes the gradient into `grad`
// (an [N, V] contiguous buffer of the student's dtype, e.g. one reused chunk
// after chunk by the fused-linear loss) and returns (hard_rows, soft_rows,
// entropy_rows). distill_forward_inplace (CPU) overwrites the (contiguous)
// student logits with their gradient: one chunk buffer fewer for the
// fused-linear loss. entropy_rows is the student's entropy H(softmax(s / T))
// per row with student_entropy (float32 [N], 0 at ignored rows), else an
// empty [0] tensor: a schema's results are fixed in number.
constexpr const char* kDistillForwardSchema =
    "distill_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor? grad_scale, "
    "float temperature, float alpha, str divergence, float beta, int ignore_index, "
    "bool scale_by_t2, bool compute_grad, float label_smoothing=0.0, bool student_entropy=False) "
    "-> (Tensor, Tensor, Tensor, Tensor)";
constexpr const char* kDistillForwardInplaceSchema =
    "distill_forward_inplace(Tensor(a!) student, Tensor teacher, Tensor? labels, "
    "Tensor? grad_scale, float temperature, float alpha, str divergence, float beta, "
    "int ignore_index, bool scale_by_t2, float label_smoothing=0.0, bool student_entropy=False) "
    "-> (Tensor, Tensor, Tensor)";
constexpr const char* kDistillForwardOutSchema =
    "distill_forward_out(Tensor student, Tensor teacher, Tensor? labels, Tensor? grad_scale, "
    "float temperature, float alpha, str divergence, float beta, int ignore_index, "
    "bool scale_by_t2, Tensor(a!) grad, float label_smoothing=0.0, bool student_entropy=False) "
    "-> (Tensor, Tensor, Tensor)";

// A validated problem: [N, V] logits whose last dim is contiguous (row stride
// free), [N] contiguous int64 labels, the 0-d float32 grad_scale, and the
// folded options.
struct DistillProblem {
  at::Tensor student;
  at::Tensor teacher;
  std::optional<at::Tensor> labels;
  std::optional<at::Tensor> grad_scale;
  LossParams params;
  int64_t n;
  int64_t v;

  // The labels' data, or nullptr without labels.
  const int64_t* label_data() const { return labels ? labels->const_data_ptr<int64_t>() : nullptr; }
  // grad_scale's data, or nullptr without one (a scale of 1).
  const float* grad_scale_data() const {
    return grad_scale ? grad_scale->const_data_ptr<float>() : nullptr;
  }
};

// Checks shapes, dtypes, devices (on kernel_device, the calling kernel's) and
// option values (the label *range* is data dependent and is checked by each
// kernel before it reads), and makes the inputs kernel-ready, copying only when
// the last dim is not contiguous.
DistillProblem prepare_problem(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& grad_scale, double temperature,
                               double alpha, c10::string_view divergence, double beta,
                               int64_t ignore_index, bool scale_by_t2,
                               c10::DeviceType kernel_device, double label_smoothing);

// The options folded into LossParams (vocab: the whole vocabulary, for label
// smoothing's eps / V), and a divergence's name parsed (a ValueError if unknown).
LossParams make_params(double temperature, double alpha, Divergence div, double beta,
                       int64_t ignore_index, bool scale_by_t2, bool has_labels,
                       double label_smoothing, int64_t vocab);
Divergence divergence_of(c10::string_view name);

// The checks and folded options of the student side alone (prepare_problem
// without a teacher): the sparse-teacher op's (sparse_op.h) too.
DistillProblem prepare_student(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& grad_scale, double temperature,
                               double alpha, c10::string_view divergence, double beta,
                               int64_t ignore_index, bool scale_by_t2,
                               c10::DeviceType kernel_device, double label_smoothing);

// hard_rows, soft_rows (float32 [N]) and the gradient (student dtype [N, V], or
// [0] when compute_grad is false: no N x V buffer is allocated then).
using DistillResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The outputs; the gradient is grad_out when given (checked: [N, V],
// contiguous, the student's dtype and device), else a new buffer.
DistillResult allocate_outputs(const DistillProblem& prob, bool compute_grad,
                               const at::Tensor* grad_out = nullptr);

// The dense kernels' results: DistillResult and the entropy rows (float32
// [N] when asked for, else [0]).
using DenseResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The entropy rows' tensor: [N] float32 when wanted, else [0].
at::Tensor allocate_entropy(const DistillProblem& prob, bool wanted);

// The logits dtypes the kernels are built for (float64 goes to the reference).
#define KDFUSED_DISPATCH_LOGITS(TYPE, NAME, ...)                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE( \
                         at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Calls f(S{}, Tt{}) for the problem's student and teacher logits types S and
// Tt (the values are tags: f takes them as auto and reads their types).
template <typename F>
void dispatch_pair(const DistillProblem& prob, F&& f) {
  KDFUSED_DISPATCH_LOGITS(prob.student.scalar_type(), "kdfused", [&] {
    using S = scalar_t;
    KDFUSED_DISPATCH_LOGITS(prob.teacher.scalar_type(), "kdfused", [&] { f(S{}, scalar_t{}); });
  });
}

// The CUDA kernels' bound on N: a block (or a cluster of blocks) per row, and
// a grid of at most 2^31 - 1 blocks.
void check_row_count(int64_t n);

// The kernels below compute, per row i, hard_i and soft_i (0 at ignored rows)
// and, when compute_grad, grad[i] = grad_scale * d loss_i / d s_i, where
// grad_scale is the optional 0-d float32 tensor (1 when absent; 1 / counted rows
// for "batchmean", so that backward has nothing left to do when grad_output = 1).
// grad_out: where to write the gradient (see allocate_outputs), or nullptr.
// student_entropy: also entropy_i = H(softmax(s_i / T)) (0 at ignored rows),
// summed in the statistics pass the row already takes.
#define KDFUSED_KERNEL_ARGS                                                                     \
  const at::Tensor &student, const at::Tensor &teacher, const std::optional<at::Tensor>&labels, \
      const std::optional<at::Tensor>&grad_scale, double temperature, double alpha,             \
      c10::string_view divergence, double beta, int64_t ignore_index, bool scale_by_t2

// KDFUSED_KERNEL_ARGS' names, to pass them on.
#define KDFUSED_KERNEL_NAMES                                                                \
  student, teacher, labels, grad_scale, temperature, alpha, divergence, beta, ignore_index, \
      scale_by_t2

DenseResult distill_cpu(KDFUSED_KERNEL_ARGS, bool compute_grad, const at::Tensor* grad_out,
                        double label_smoothing, bool student_entropy);
// The same arguments with the student mutable (distill_forward_inplace).
#define KDFUSED_KERNEL_ARGS_MUTABLE                                                       \
  at::Tensor &student, const at::Tensor &teacher, const std::optional<at::Tensor>&labels, \
      const std::optional<at::Tensor>&grad_scale, double temperature, double alpha,       \
      c10::string_view divergence, double beta, int64_t ignore_index, bool scale_by_t2
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_inplace_cpu(
    KDFUSED_KERNEL_ARGS_MUTABLE, double label_smoothing, bool student_entropy);
DenseResult distill_cuda(KDFUSED_KERNEL_ARGS, bool compute_grad, const at::Tensor* grad_out,
                         double label_smoothing, bool student_entropy);

// The two ops over one device's kernel (registration.cpp, tests/emulator/).
template <DenseResult (*Kernel)(KDFUSED_KERNEL_ARGS, bool, const at::Tensor*, double, bool)>
DenseResult distill_forward_op(KDFUSED_KERNEL_ARGS, bool compute_grad, double label_smoothing,
                               bool student_entropy) {
  return Kernel(KDFUSED_KERNEL_NAMES, compute_grad, nullptr, label_smoothing, student_entropy);
}

template <DenseResult (*Kernel)(KDFUSED_KERNEL_ARGS, bool, const at::Tensor*, double, bool)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_out_op(KDFUSED_KERNEL_ARGS,
                                                                      at::Tensor& grad,
                                                                      double label_smoothing,
                                                                      bool student_entropy) {
  auto result = Kernel(KDFUSED_KERNEL_NAMES, true, &grad, label_smoothing, student_entropy);
  return {std::get<0>(result), std::get<1>(result), std::get<3>(result)};
}

// The CPU kernel's instruction set for this process: "avx2" (AVX2 + FMA, when
// the CPU has both) or "default" (baseline x86-64; forced by
// KDFUSED_CPU_CAPABILITY=default).
std::string cpu_capability();

// What this library was built with, for bug reports (kdfused.build_info()):
// "torch=2.13.0" and, with the CUDA kernels, ";cuda=13000;cuda_archs=800,900"
// (the CUDA runtime version and the compiled sm_ targets).
std::string build_config();
#ifdef KDFUSED_WITH_CUDA
std::string cuda_build_config();  // the CUDA part, from a .cu file (nvcc's macros)
#endif

}  // namespace kdfused
