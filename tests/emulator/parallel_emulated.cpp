// kdfused_emulated::distill_stats, ::distill_jsd_sums and ::distill_grad: the
// vocab-parallel phases' CUDA kernels (csrc/cuda/parallel_kernel.cuh) run on
// CPU tensors by cuda_emulator.h, with the launch configuration of
// csrc/cuda/parallel_cuda.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "distill_op.h"
#include "parallel_op.h"
// clang-format off: the emulator must come after the torch headers
#include "cuda_emulator.h"
#include "cuda/parallel_kernel.cuh"
// clang-format on

namespace kdfused {
namespace {

DistillProblem emulated_shard(KDFUSED_PHASE_ARGS) {
  return prepare_shard(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                       ignore_index, scale_by_t2, label_smoothing, column_offset, vocab,
                       c10::DeviceType::CPU);
}

template <typename F>
void emulate(const DistillProblem& prob, F&& body) {
  emu::failed_asserts = 0;
  emu::dynamic_bytes = 0;
  KDFUSED_DISPATCH_LOGITS(prob.student.scalar_type(), "kdfused_phase_emulated", [&] {
    using S = scalar_t;
    KDFUSED_DISPATCH_LOGITS(prob.teacher.scalar_type(), "kdfused_phase_emulated",
                            [&] { body(S{}, scalar_t{}); });
  });
  TORCH_CHECK(emu::failed_asserts == 0,
              "CUDA error: device-side assert triggered (emulated: ", emu::first_failed, ")");
}

const int64_t* labels_of(const DistillProblem& prob) {
  return prob.labels ? prob.labels->const_data_ptr<int64_t>() : nullptr;
}

at::Tensor stats_emulated(KDFUSED_PHASE_ARGS) {
  const DistillProblem prob =
      emulated_shard(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                     ignore_index, scale_by_t2, label_smoothing, column_offset, vocab);
  at::Tensor out = at::empty({prob.n, 12}, prob.student.options().dtype(at::kFloat));
  if (prob.n == 0) return out;
  emulate(prob, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    emu::launch(static_cast<unsigned>(prob.n),
                cuda::block_threads(prob.v, cuda::pack_width<S, Tt>(), 1), 1u,
                &cuda::shard_stats_kernel<S, Tt>, prob.student.const_data_ptr<S>(),
                prob.teacher.const_data_ptr<Tt>(), prob.student.stride(0), prob.teacher.stride(0),
                labels_of(prob), prob.v, column_offset, vocab, prob.params, out.data_ptr<float>());
  });
  return out;
}

at::Tensor jsd_sums_emulated(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob =
      emulated_shard(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                     ignore_index, scale_by_t2, label_smoothing, column_offset, vocab);
  check_consts(consts, prob);
  at::Tensor out = at::empty({prob.n, 2}, prob.student.options().dtype(at::kFloat));
  if (prob.n == 0) return out;
  emulate(prob, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    emu::launch(static_cast<unsigned>(prob.n),
                cuda::block_threads(prob.v, cuda::pack_width<S, Tt>(), 1), 1u,
                &cuda::shard_jsd_kernel<S, Tt>, prob.student.const_data_ptr<S>(),
                prob.teacher.const_data_ptr<Tt>(), prob.student.stride(0), prob.teacher.stride(0),
                labels_of(prob), prob.v, prob.params, consts.const_data_ptr<float>(),
                out.data_ptr<float>());
  });
  return out;
}

at::Tensor grad_emulated(KDFUSED_PHASE_ARGS, const at::Tensor& consts) {
  const DistillProblem prob =
      emulated_shard(student, teacher, labels, grad_scale, temperature, alpha, divergence, beta,
                     ignore_index, scale_by_t2, label_smoothing, column_offset, vocab);
  check_consts(consts, prob);
  at::Tensor grad = at::empty({prob.n, prob.v}, prob.student.options());
  if (prob.n == 0) return grad;
  emulate(prob, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using Tt = decltype(t_tag);
    emu::launch(
        static_cast<unsigned>(prob.n), cuda::block_threads(prob.v, cuda::pack_width<S, Tt>(), 1),
        1u, &cuda::shard_grad_kernel<S, Tt>, prob.student.const_data_ptr<S>(),
        prob.teacher.const_data_ptr<Tt>(), prob.student.stride(0), prob.teacher.stride(0),
        labels_of(prob), grad_scale ? grad_scale->const_data_ptr<float>() : nullptr,
        grad.data_ptr<S>(), prob.v, column_offset, prob.params, consts.const_data_ptr<float>());
  });
  return grad;
}

}  // namespace
}  // namespace kdfused

TORCH_LIBRARY_FRAGMENT(kdfused_emulated, m) {
  m.def(kdfused::kDistillStatsSchema);
  m.def(kdfused::kDistillJsdSumsSchema);
  m.def(kdfused::kDistillGradSchema);
}

TORCH_LIBRARY_IMPL(kdfused_emulated, CPU, m) {
  m.impl("distill_stats", &kdfused::stats_emulated);
  m.impl("distill_jsd_sums", &kdfused::jsd_sums_emulated);
  m.impl("distill_grad", &kdfused::grad_emulated);
}
