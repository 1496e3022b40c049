// The device-independent half of the sparse-teacher ops (docs/design.md, "The sparse teacher"):
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
// (padded: -1 pads a row) or, with offsets int64 [N + 1], [total] (ragged: row
// i is entries [offsets[i], offsets[i + 1])), and its store temperature and
// tail rule. ids: int64, int32 or uint16; log-probs: float32, float16 or
// bfloat16, read by the kernels in those dtypes.
constexpr const char* kSparseForwardSchema =
    "sparse_distill_forward(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, "
    "Tensor? grad_scale, float temperature, float store_temperature, str tail, float alpha, "
    "str divergence, float beta, int ignore_index, bool scale_by_t2, bool compute_grad, "
    "float label_smoothing=0.0, Tensor? offsets=None) -> (Tensor, Tensor, Tensor)";
constexpr const char* kSparseForwardOutSchema =
    "sparse_distill_forward_out(Tensor student, Tensor indices, Tensor logprobs, Tensor? labels, "
    "Tensor? grad_scale, float temperature, float store_temperature, str tail, float alpha, "
    "str divergence, float beta, int ignore_index, bool scale_by_t2, Tensor(a!) grad, "
    "float label_smoothing=0.0, Tensor? offsets=None) -> (Tensor, Tensor)";
// The k largest log_softmax(logits / temperature) per row and their ids
// (int64), largest first, ties to the lower id.
constexpr const char* kSparseTopkSchema =
    "sparse_topk(Tensor logits, int k, float temperature) -> (Tensor, Tensor)";

// A validated sparse problem: the student side as prepare_student leaves it,
// the kept ids and their log-probs contiguous in the dtypes they came in (the
// kernels convert each entry as they read it: no copy of the batch in another
// dtype), and the ragged layout's offsets.
struct SparseProblem {
  DistillProblem base;
  at::Tensor indices;
  at::Tensor logprobs;
  std::optional<at::Tensor> offsets;  // ragged: int64 [N + 1]; padded: none
  int64_t k;                          // padded: entries per row; ragged: the longest row's
  Tail tail;
  float st_over_t;  // store_temperature / temperature

  // The entries as the kernels read them.
  TeacherEntries entries() const;
};

#define KDFUSED_SPARSE_ARGS                                                               \
  const at::Tensor &student, const at::Tensor &indices, const at::Tensor &logprobs,       \
      const std::optional<at::Tensor>&labels, const std::optional<at::Tensor>&grad_scale, \
      double temperature, double store_temperature, c10::string_view tail, double alpha,  \
      c10::string_view divergence, double beta, int64_t ignore_index, bool scale_by_t2

// Their names, to pass them on.
#define KDFUSED_SPARSE_NAMES                                                                   \
  student, indices, logprobs, labels, grad_scale, temperature, store_temperature, tail, alpha, \
      divergence, beta, ignore_index, scale_by_t2

// offsets (ragged rows) are checked here: offsets[0] = 0, never decreasing,
// offsets[N] = total (one copy of four numbers to the host).
SparseProblem prepare_sparse(KDFUSED_SPARSE_ARGS, c10::DeviceType kernel_device,
                             double label_smoothing,
                             const std::optional<at::Tensor>& offsets = std::nullopt);

// The kernels: per row i, hard_i and soft_i (0 at ignored rows) and, when
// compute_grad, grad[i] = grad_scale * d loss_i / d s_i over the whole row
// (grad_out: where to write it, as allocate_outputs; else a new buffer). A kept
// id outside [0, V), or repeated within its row (ignored rows included), is an
// error (CPU: a ValueError before anything is computed; CUDA: a device-side
// assert, as for the labels); -1 pads a row, and a padded entry's log-prob is
// not read. offsets: the ragged layout's, or none (padded).
DistillResult sparse_cpu(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                         double label_smoothing, const std::optional<at::Tensor>& offsets);
DistillResult sparse_cuda(KDFUSED_SPARSE_ARGS, bool compute_grad, const at::Tensor* grad_out,
                          double label_smoothing, const std::optional<at::Tensor>& offsets);
std::tuple<at::Tensor, at::Tensor> sparse_topk_cpu(const at::Tensor& logits, int64_t k,
                                                   double temperature);
std::tuple<at::Tensor, at::Tensor> sparse_topk_cuda(const at::Tensor& logits, int64_t k,
                                                    double temperature);

// Checks of sparse_topk's arguments; returns the logits with a contiguous last dim.
at::Tensor prepare_topk(const at::Tensor& logits, int64_t k, double temperature,
                        c10::DeviceType kernel_device);

// The two ops over one device's kernel (registration.cpp, tests/emulator/).
using SparseKernelFn = DistillResult (*)(KDFUSED_SPARSE_ARGS, bool, const at::Tensor*, double,
                                         const std::optional<at::Tensor>&);

template <SparseKernelFn Kernel>
DistillResult sparse_forward_op(KDFUSED_SPARSE_ARGS, bool compute_grad, double label_smoothing,
                                const std::optional<at::Tensor>& offsets) {
  return Kernel(KDFUSED_SPARSE_NAMES, compute_grad, nullptr, label_smoothing, offsets);
}

template <SparseKernelFn Kernel>
std::tuple<at::Tensor, at::Tensor> sparse_forward_out_op(KDFUSED_SPARSE_ARGS, at::Tensor& grad,
                                                         double label_smoothing,
                                                         const std::optional<at::Tensor>& offsets) {
  auto result = Kernel(KDFUSED_SPARSE_NAMES, true, &grad, label_smoothing, offsets);
  return {std::get<0>(result), std::get<1>(result)};
}

}  // namespace kdfused
