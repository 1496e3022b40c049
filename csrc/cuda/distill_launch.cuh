// The launch of distill_rows_kernel (distill_kernel.cuh) for a problem,
// through a launcher policy (launch.cuh): distill_cuda.cu's, and the
// emulator's in tests/emulator/.
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>

#include "../distill_op.h"
#include "distill_kernel.cuh"
#include "launch.cuh"

namespace kdfused {
namespace cuda {

// Calls f(S{}, Tt{}, rows...) for the problem's logits types S and Tt, rows...
// the arguments that every row kernel's list starts with: the student and
// teacher logits, their row strides and the labels (nullptr: none). Does
// nothing for a problem of no rows (a grid of no blocks is no launch).
template <typename F>
void for_row_kernel(const DistillProblem& prob, F&& f) {
  if (prob.n == 0) return;
  dispatch_pair(prob, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    f(s_tag, t_tag, prob.student.const_data_ptr<S>(), prob.teacher.const_data_ptr<Tt>(),
      prob.student.stride(0), prob.teacher.stride(0), prob.label_data());
  });
}

// distill_rows_kernel over the problem's rows: hard and soft [N] and, when
// grad is given (an [N, V] contiguous buffer of the student's dtype), the
// gradient, and when entropy is given ([N] float32), the student's entropy.
// A block per row, or a cluster of requested_split() blocks per row where the
// grid has room for them and the device schedules such clusters.
template <typename Launcher>
void launch_distill(const Launcher& launcher, const DistillProblem& prob, const at::Tensor& hard,
                    const at::Tensor& soft, const at::Tensor* grad,
                    const at::Tensor* entropy = nullptr) {
  const auto launch = [&](auto with_entropy) {
    constexpr bool kEntropy = decltype(with_entropy)::value;
    for_row_kernel(prob, [&](auto s_tag, auto t_tag, auto... rows) {
      using S = decltype(s_tag);
      using Tt = decltype(t_tag);
      const int width = pack_width<S, Tt>();
      const auto split_kernel = &distill_rows_kernel<S, Tt, true, kEntropy>;
      int parts = requested_split();
      if (parts > 1) {
        parts = prob.n <= kMaxBlocks / parts
                    ? launcher.split_for(split_kernel, parts, block_threads(prob.v, width, parts))
                    : 1;
      }
      launcher.launch(Launch{prob.n * parts, block_threads(prob.v, width, parts), parts},
                      parts > 1 ? split_kernel : &distill_rows_kernel<S, Tt, false, kEntropy>,
                      rows..., prob.grad_scale_data(), hard.data_ptr<float>(),
                      soft.data_ptr<float>(), grad ? grad->data_ptr<S>() : nullptr,
                      entropy ? entropy->data_ptr<float>() : nullptr, prob.v, prob.params);
    });
  };
  if (entropy != nullptr) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

}  // namespace cuda
}  // namespace kdfused
