// The device-independent half of the sparse-teacher ops (DESIGN.md section 6):
// kdfused::sparse_distill_forward (and its _out form) take the teacher as k
// stored log-probabilities per row; kdfused::sparse_topk extracts them from
// dense teacher logits.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "distill_op.h"

namespace kdfused {

// distill_forward's arguments with the teacher as (indices, logprobs) [N, k]
// and its store temperature and tail rule.
constexpr const char* kSparseForwardSchema =
    "sparse_distill_forward(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, "
    "Tensor? grad_scale, float temperature, float store_temperature, str tail, float alpha, "
    "str divergence, float beta, int ignore_index, bool scale_by_t2, bool compute_grad, "
    "float label_smoothing=0.0) -> (Tensor, Tensor, Tensor)";
constexpr const char* kSparseForwardOutSchema =
    "sparse_distill_forward_out(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, "
    "Tensor? grad_scale, float temperature, float store_temperature, str tail, float alpha, "
    "str divergence, float beta, int ignore_index, bool scale_by_t2, Tensor(a!) grad, "
    "float label_smoothing=0.0) -> (Tensor, Tensor)";
// The k largest log_softmax(logits / temperature) per row and their ids
// (int64), largest first, ties to the lower id.
constexpr const char* kSparseTopkSchema =
    "sparse_topk(Tensor logits, int k, float temperature) -> (Tensor, Tensor)";

// A validated sparse problem: the student side as prepare_student leaves it,
// the kept ids as [N, k] contiguous int64 and their log-probs as [N, k]
// contiguous float32 (both small: converted here, not in the kernels).
struct SparseProblem {
  DistillProblem base;
  at::Tensor indices;
  at::Tensor logprobs;
  int64_t k;
  Tail tail;
  float st_over_t;  // store_temperature / temperature
};

#define KDFUSED_SPARSE_ARGS                                                               \
  const at::Tensor &student, const at::Tensor &indices, const at::Tensor &logprobs,       \
      const std::optional<at::Tensor>&labels, const std::optional<at::Tensor>&grad_scale, \
      double temperature, double store_temperature, c10::string_view tail, double alpha,  \
      c10::string_view divergence, double beta, int64_t ignore_index, bool scale_by_t2

SparseProblem prepare_sparse(KDFUSED_SPARSE_ARGS, c10::DeviceType kernel_device,
                             double label_smoothing);

// The kernels: per row i, hard_i and soft_i (0 at ignored rows) and, when
// compute_grad, grad[i] = grad_scale * d loss_i / d s_i over the whole row
// (grad_out: where to write it, as allocate_outputs; else a new buffer). A kept
// id outside [0, V), or repeated within its row (ignored rows included), is an
// error (CPU: a ValueError before anything is computed; CUDA: a device-side
// assert, as for the labels); -1 pads a row, and a padded entry's log-prob is
// not read.
DistillResult sparse_cpu(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                         double label_smoothing);
DistillResult sparse_cuda(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                          double label_smoothing);
std::tuple<at::Tensor, at::Tensor> sparse_topk_cpu(const at::Tensor& logits, int64_t k,
                                                   double temperature);
std::tuple<at::Tensor, at::Tensor> sparse_topk_cuda(const at::Tensor& logits, int64_t k,
                                                    double temperature);

// Checks of sparse_topk's arguments; returns the logits with a contiguous last dim.
at::Tensor prepare_topk(const at::Tensor& logits, int64_t k, double temperature,
                        c10::DeviceType kernel_device);

// The two ops over one device's kernel (registration.cpp, tests/emulator/).
template <DistillResult (*Kernel)(KDFUSED_SPARSE_ARGS, bool, const at::Tensor*, double)>
DistillResult sparse_forward_op(KDFUSED_SPARSE_ARGS, bool compute_grad, double label_smoothing) {
  return Kernel(student, indices, logprobs, labels, grad_scale, temperature, store_temperature,
                tail, alpha, divergence, beta, ignore_index, scale_by_t2, compute_grad, nullptr,
                label_smoothing);
}

template <DistillResult (*Kernel)(KDFUSED_SPARSE_ARGS, bool, const at::Tensor*, double)>
std::tuple<at::Tensor, at::Tensor> sparse_forward_out_op(KDFUSED_SPARSE_ARGS, at::Tensor& grad,
                                                         double label_smoothing) {
  auto result =
      Kernel(student, indices, logprobs, labels, grad_scale, temperature, store_temperature, tail,
             alpha, divergence, beta, ignore_index, scale_by_t2, true, &grad, label_smoothing);
  return {std::get<0>(result), std::get<1>(result)};
}

}  // namespace kdfused
